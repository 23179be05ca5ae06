"""The ``ipfacediff`` command line.

A user's mistake (missing file, bad model folder, empty prompt, ...) is a :class:`UserError`:
it is printed as one ``error:`` line on stderr and the command exits with code 2, never with a
traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from typer._click import exceptions as typer_click_exceptions
from rich.console import Console

from ipfacediff.editing import (
    DEFAULT_ALL_KEYFRAMES_BELOW,
    DEFAULT_BLEND_THRESHOLD,
    DEFAULT_GUIDANCE,
    DEFAULT_INJECT_ATTENTION_UNTIL,
    DEFAULT_INJECT_FEATURE_UNTIL,
    DEFAULT_PROPAGATION_TEMPERATURE,
    DEFAULT_TEMPORAL_SMOOTHING,
    DEFAULT_STEPS,
)
from ipfacediff.errors import UserError
from ipfacediff.progress import progress_bars as rich_progress_bars

app = typer.Typer(
    name="ipfacediff",
    help="Edit the faces in a video from a text prompt, keeping the person recognisable and the video flicker-free.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
# typer (0.2x) parses with its own copy of click, whose errors are not click's classes.
CLICK_ERRORS = (click.ClickException, typer_click_exceptions.ClickException)


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, torchvision notices) would bury our progress bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def progress_bars():
    """A rich progress display on stderr; yields progress(stage, done, total) for the library's callbacks."""
    return rich_progress_bars(console)




ModelOption = typer.Option(None, "--model", "-m", help="SD-1.x model: diffusers folder, hub id (from the local cache when offline) or single .safetensors file. Default: the embedded model set.")
IdentityModelOption = typer.Option(None, "--identity-model", help="ε1 as a separate UNet (diffusers model or UNet folder, or hub id). Default: the base UNet.")
IdentityLoraOption = typer.Option(None, "--identity-lora", help="ε1 as a LoRA adapter (.safetensors, diffusers format) over the base UNet.")
EditLoraOption = typer.Option(None, "--edit-lora", help="ε2 LoRA adapter, PATH or PATH:WEIGHT; repeat for multi-attribute edits.")
ConfigOption = typer.Option(None, "--config", help="Architecture (diffusers folder or cached hub id) for a single-file checkpoint.")
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
DtypeOption = typer.Option("auto", "--dtype", help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16.")
AllowPickleOption = typer.Option(False, "--allow-pickle", help="Also read pickled .bin/.ckpt weights (they can run code: only for files you trust).")
NoAdapterLibraryOption = typer.Option(False, "--no-adapter-library", help="Ignore the ε1/ε2 adapters the model folder ships (ε1 = ε2 = base unless --identity-lora/--edit-lora).")
CacheOption = typer.Option(None, "--cache-dir", help="Inversion cache folder. Default: $IPFACEDIFF_CACHE or ~/.cache/ipfacediff.")


def _pipeline(model, identity_model, identity_lora, edit_lora, config, device, dtype, allow_pickle,
              adapter_library=True):
    from ipfacediff.job import load_pipeline
    from ipfacediff.models import parse_lora_spec

    return load_pipeline(model, identity_model=identity_model, identity_lora=identity_lora,
                         edit_loras=[parse_lora_spec(s) for s in edit_lora or []], config=config,
                         device=device, dtype=dtype, allow_pickle=allow_pickle, adapter_library=adapter_library)


def _cache(cache_dir: Optional[Path]):
    from ipfacediff.diffusion import InversionCache

    return InversionCache(cache_dir / "inversion" if cache_dir else None)


@app.command()
def edit(
    input: Path = typer.Argument(..., help="Video to edit (any format ffmpeg reads)."),
    output: Path = typer.Option(..., "--output", "-o", help="Edited video to write (.mp4); never the input."),
    prompt: str = typer.Option(..., "--prompt", "-p", help='What the face should show, e.g. "a face with eyeglasses".'),
    source_prompt: str = typer.Option("", "--source-prompt", help="What the input shows; used for inversion and ε1 features."),
    model: Optional[str] = ModelOption,
    identity_model: Optional[str] = IdentityModelOption,
    identity_lora: Optional[str] = IdentityLoraOption,
    edit_lora: Optional[list[str]] = EditLoraOption,
    adapters: str = typer.Option("auto", "--adapters", help='ε2 adapters of the model\'s library: "auto" (picked by the prompt\'s words), "none", or names "eyeglasses" / "eyeglasses:0.8,smile".'),
    no_adapter_library: bool = NoAdapterLibraryOption,
    config: Optional[str] = ConfigOption,
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Side of the aligned face crop. Default: the model's (512 for SD-1.5)."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="DDIM steps for inversion and editing."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help=f"Classifier-free guidance scale. Default: the value the edit's adapter was tuned with, else {DEFAULT_GUIDANCE}."),
    keyframes: Optional[int] = typer.Option(None, "--keyframes", help="Keyframes edited jointly per step. Default: one per 8 frames."),
    propagation_temperature: float = typer.Option(DEFAULT_PROPAGATION_TEMPERATURE, "--propagation-temperature", help="How softly keyframe edits reach the other frames: 0 = each token takes its single nearest keyframe token (TokenFlow); above 0, a softmax of feature similarities over this temperature."),
    temporal_smoothing: float = typer.Option(DEFAULT_TEMPORAL_SMOOTHING, "--temporal-smoothing", help="Each frame's edit takes this share (0-0.5) from each neighbouring frame's at every step, and the local blend's region is filtered over time the same way, against flicker; 0 = off."),
    inject_feature_until: int = typer.Option(DEFAULT_INJECT_FEATURE_UNTIL, "--inject-feature-until", help="Inject ε1's residual features while the timestep is above this (0-1000)."),
    all_keyframes_below: int = typer.Option(DEFAULT_ALL_KEYFRAMES_BELOW, "--all-keyframes-below", help="At steps whose timestep is below this (0-1000), every frame gets its own ε2 pass instead of a propagated edit (less flicker, more time); 0 = off."),
    inject_attention_until: int = typer.Option(DEFAULT_INJECT_ATTENTION_UNTIL, "--inject-attention-until", help="Inject ε1's self-attention Q/K while the timestep is above this (0-1000)."),
    strength: float = typer.Option(1.0, "--strength", help="Fraction of the schedule re-generated (1 = from full noise)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the keyframe choice."),
    no_identity_guidance: bool = typer.Option(False, "--no-identity-guidance", help="Ablation: ε2 guides itself (TokenFlow-like)."),
    every_frame: bool = typer.Option(False, "--every-frame", help="Ablation: edit each frame on its own (the naive baseline)."),
    faces: str = typer.Option("all", "--faces", help='Faces to edit: "all", "largest" or track ids "0,2".'),
    tracks: Optional[Path] = typer.Option(None, "--tracks", help="Face tracks JSON (the `faces` schema) to use instead of detection."),
    require_face: bool = typer.Option(False, "--require-face", help="Exit with an error when no face is found."),
    whole_frame: bool = typer.Option(False, "--whole-frame", help="Edit the whole frame (resized to the model's size) instead of face crops."),
    hair: bool = typer.Option(False, "--hair", help="An edit of the hair: keep the inner face (brows to mouth) and blend the whole crop back, not just the face (on for a hair adapter)."),
    no_local_blend: bool = typer.Option(False, "--no-local-blend", help="Let the edit change the whole face, not only where ε2's prediction under the prompt differs from that under the source prompt."),
    blend_threshold: Optional[float] = typer.Option(None, "--blend-threshold", help=f"Where the edit may change the latents: above this share (0-1) of the frame's largest prompt-vs-source difference of ε2's prediction. Default: the value the edit's adapter was tuned with, else {DEFAULT_BLEND_THRESHOLD}."),
    no_detail_transfer: bool = typer.Option(False, "--no-detail-transfer", help="Do not put the detail the VAE loses back where the edit changed nothing."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Score the result right after: OUTPUT's .metrics.json and .report.html."),
    clip: Optional[str] = typer.Option(None, "--clip", help="With --evaluate: CLIPModel folder or hub id for clip_direction/clip_score."),
    device: str = DeviceOption,
    dtype: str = DtypeOption,
    allow_pickle: bool = AllowPickleOption,
    cache_dir: Optional[Path] = CacheOption,
) -> None:
    """Edit the faces of INPUT so they show PROMPT; writes OUTPUT and OUTPUT's .run.json."""
    from ipfacediff.job import EditSettings, check_paths, edit_video, run_metadata_path

    settings = EditSettings(
        prompt=prompt, source_prompt=source_prompt, steps=steps, guidance=guidance, keyframes=keyframes,
        propagation_temperature=propagation_temperature, temporal_smoothing=temporal_smoothing,
        inject_feature_until=inject_feature_until, inject_attention_until=inject_attention_until,
        all_keyframes_below=all_keyframes_below, strength=strength,
        seed=seed, identity_guidance=not no_identity_guidance, every_frame=every_frame, resolution=resolution,
        faces=faces, require_face=require_face, whole_frame=whole_frame, hair=hair, adapters=adapters,
        detail_transfer=not no_detail_transfer, local_blend=not no_local_blend, blend_threshold=blend_threshold,
    )
    settings.validate()
    check_paths(input, output)  # before the slow model load
    pipe = _pipeline(model, identity_model, identity_lora, edit_lora, config, device, dtype, allow_pickle,
                     adapter_library=not no_adapter_library)
    pipe.edit_weights(prompt, source_prompt, adapters)  # an unknown adapter name fails before any work
    with progress_bars() as progress:
        report = edit_video(input, output, settings, pipeline=pipe, tracks_path=tracks, cache=_cache(cache_dir),
                            progress=progress, log=lambda m: console.print(m))
    reused = " (inversion reused from the cache)" if report.inversion_reused else ""
    console.print(f"{report.message}{reused} in {report.seconds['total']:.1f} s")
    typer.echo(f"wrote {output} and {run_metadata_path(output)}")
    if evaluate:
        _evaluate(input, output, prompt=prompt, source_prompt=source_prompt or None, clip=clip,
                  json_path=output.with_name(output.stem + ".metrics.json"),
                  html_path=output.with_name(output.stem + ".report.html"))


def _evaluate(original: Path, edited: Path, *, prompt, source_prompt, clip, json_path, html_path) -> dict:
    from ipfacediff.evaluation import evaluate_videos, write_html_report, write_metrics_json

    with progress_bars() as progress:
        metrics = evaluate_videos(original, edited, prompt=prompt, source_prompt=source_prompt, clip=clip,
                                  progress=progress)
    summary = ", ".join(f"{key} {metrics[key]:.3f}" for key in ("id_sim", "id_drift", "tl_id", "tg_id",
                        "warp_error_ratio", "flicker", "clip_direction") if isinstance(metrics.get(key), float))
    typer.echo(summary or "no face to score")
    if json_path:
        typer.echo(f"wrote {write_metrics_json(metrics, json_path)}")
    if html_path:
        typer.echo(f"wrote {write_html_report(metrics, original, edited, html_path)}")
    return metrics


@app.command("evaluate")
def evaluate_command(
    original: Path = typer.Argument(..., help="The video before the edit."),
    edited: Path = typer.Argument(..., help="The edited video (same frames and size)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The edit's prompt (default: from the edit's .run.json)."),
    source_prompt: Optional[str] = typer.Option(None, "--source-prompt", help='What the input shows (default "a face").'),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIPModel folder or hub id, for clip_direction and clip_score."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the metrics here (JSON)."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
) -> None:
    """Score an edit: identity kept (id_sim, id_drift, tl_id, tg_id), edit made (CLIP), flicker (warp error)."""
    _evaluate(original, edited, prompt=prompt, source_prompt=source_prompt, clip=clip, json_path=json_path,
              html_path=html_path)


train_app = typer.Typer(help="Fine-tune ε1 (identity) or ε2 (edit) as LoRA adapters.", no_args_is_help=True)
app.add_typer(train_app, name="train")


IdentityNetOption = typer.Option(None, "--identity-net", help="Identity network of the identity loss: dlib .dat, ArcFace IResNet .pth, or a FaceWorld identity folder. Default: dlib's face net.")


def _loss_progress(progress):
    """The trainers report (stage, done, total, loss); the bars take the first three."""
    return lambda stage, done, total, loss=None: progress(stage, done, total)


@train_app.command("identity")
def train_identity_command(
    model: str = typer.Option(..., "--model", "-m", help="Base SD-1.x model (folder, hub id or .safetensors)."),
    data: Path = typer.Option(..., "--data", help="Folder of aligned face images, or video(s) to take faces from."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the adapter, checkpoints and training.json."),
    max_steps: int = typer.Option(500, "--max-steps"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Default: the model's."),
    rank: int = typer.Option(4, "--rank", help="LoRA rank."),
    batch_size: int = typer.Option(4, "--batch-size"),
    learning_rate: float = typer.Option(1e-4, "--learning-rate"),
    lambda_id: float = typer.Option(0.1, "--lambda-id", help="Weight of the identity loss."),
    full: bool = typer.Option(False, "--full", help="Fine-tune the whole UNet instead of a LoRA."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUTPUT."),
    seed: int = typer.Option(0, "--seed"),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, fp16 or bf16."),
    gradient_accumulation: int = typer.Option(1, "--gradient-accumulation"),
    max_images: Optional[int] = typer.Option(None, "--max-images"),
    identity_net: Optional[Path] = IdentityNetOption,
) -> None:
    """Fine-tune ε1 with MSE + λ_id·(1 − cos(ID(x̂0), ID(x0))), prompt ""."""
    from ipfacediff.training import train_identity

    with progress_bars() as progress:
        result = train_identity(model, data, output, max_steps=max_steps, resolution=resolution, rank=rank,
                                batch_size=batch_size, learning_rate=learning_rate, lambda_id=lambda_id, full=full,
                                checkpoint_every=checkpoint_every, resume=resume, seed=seed,
                                mixed_precision=mixed_precision, gradient_accumulation=gradient_accumulation,
                                max_images=max_images, identity=identity_net, progress=_loss_progress(progress))
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter: {result.adapter} "
               f"(use it with --identity-lora)")


@train_app.command("edit")
def train_edit_command(
    model: str = typer.Option(..., "--model", "-m", help="Base SD-1.x model (folder, hub id or .safetensors)."),
    source: str = typer.Option(..., "--source", help='What the training faces show, e.g. "a face".'),
    target: str = typer.Option(..., "--target", help='What they should show, e.g. "a face with eyeglasses".'),
    data: Path = typer.Option(..., "--data", help="Folder of aligned face images, or video(s) to take faces from."),
    clip: str = typer.Option(..., "--clip", help="CLIPModel folder or hub id for the directional loss."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the adapter, checkpoints and training.json."),
    max_steps: int = typer.Option(200, "--max-steps"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Default: the model's."),
    rank: int = typer.Option(4, "--rank", help="LoRA rank."),
    batch_size: int = typer.Option(2, "--batch-size"),
    learning_rate: float = typer.Option(1e-4, "--learning-rate"),
    lambda_dir: float = typer.Option(1.0, "--lambda-dir"),
    lambda_id: float = typer.Option(0.1, "--lambda-id"),
    lambda_l1: float = typer.Option(0.1, "--lambda-l1"),
    t0: int = typer.Option(500, "--t0", help="Timestep the faces are inverted to before regeneration."),
    inversion_steps: int = typer.Option(40, "--inversion-steps"),
    generation_steps: int = typer.Option(6, "--generation-steps"),
    full: bool = typer.Option(False, "--full", help="Fine-tune the whole UNet instead of a LoRA."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUTPUT."),
    seed: int = typer.Option(0, "--seed"),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, fp16 or bf16."),
    gradient_accumulation: int = typer.Option(1, "--gradient-accumulation"),
    max_images: Optional[int] = typer.Option(None, "--max-images"),
    target_images: Optional[Path] = typer.Option(
        None, "--target-images",
        help="Example faces showing the target (any people): CLIP's direction is taken from the data's "
             "images to these instead of from --source to --target text."),
    paired_targets: Optional[Path] = typer.Option(
        None, "--paired-targets",
        help="The --data images edited, under the same file names (before/after pairs): each result is "
             "compared with its edited face, and each pair gives CLIP's direction."),
    identity_net: Optional[Path] = IdentityNetOption,
) -> None:
    """Fine-tune ε2 with the directional CLIP loss (DiffusionCLIP-style), plus identity and L1 terms."""
    from ipfacediff.training import train_edit

    with progress_bars() as progress:
        result = train_edit(model, source, target, data, clip, output, max_steps=max_steps, resolution=resolution,
                            rank=rank, batch_size=batch_size, learning_rate=learning_rate, lambda_dir=lambda_dir,
                            lambda_id=lambda_id, lambda_l1=lambda_l1, t0=t0, inversion_steps=inversion_steps,
                            generation_steps=generation_steps, full=full, checkpoint_every=checkpoint_every,
                            resume=resume, seed=seed, mixed_precision=mixed_precision,
                            gradient_accumulation=gradient_accumulation, max_images=max_images,
                            target_images=target_images, paired_targets=paired_targets, identity=identity_net,
                            progress=_loss_progress(progress))
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter: {result.adapter} "
               f"(use it with --edit-lora {result.adapter}:1.0)")


faceworld_app = typer.Typer(help="FaceWorld: look at it, and train the embedded default models on it.",
                            no_args_is_help=True)
app.add_typer(faceworld_app, name="faceworld")
# Each command hands its arguments to the module's own parser (so `--help` is the module's).
FACEWORLD_COMMANDS = {
    "train": ("ipfacediff.faceworld.train",
              "Train the SD-1.x model set from scratch: OUTPUT [--preset smoke|cpu-1h|cpu|gpu] [--resume]."),
    "oracles": ("ipfacediff.faceworld.oracles",
                "Train the identity net and attribute oracle the benchmark scores with: OUTPUT [--preset]."),
    "adapters": ("ipfacediff.faceworld.adapters",
                 "Train ε1 and the four ε2 adapters into MODEL/adapters: MODEL [--preset smoke|cpu|gpu] [--resume]."),
    "render": ("ipfacediff.faceworld.__main__",
               "A contact sheet (`sheet`) or a scene clip with its ground-truth tracks (`clip OUT.mp4 [--edit E]`)."),
}


def _forward_to(module: str):
    def command(ctx: typer.Context) -> None:
        importlib.import_module(module).main(list(ctx.args))

    return command


for _name, (_module, _help) in FACEWORLD_COMMANDS.items():
    faceworld_app.command(_name, help=_help, add_help_option=False, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})(_forward_to(_module))


@app.command()
def invert(
    input: Path = typer.Argument(..., help="Video whose faces to invert."),
    model: Optional[str] = ModelOption,
    identity_model: Optional[str] = IdentityModelOption,
    identity_lora: Optional[str] = IdentityLoraOption,
    config: Optional[str] = ConfigOption,
    source_prompt: str = typer.Option("", "--source-prompt", help="Inversion prompt."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Side of the aligned face crop."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="DDIM inversion steps."),
    faces: str = typer.Option("all", "--faces", help='Faces to invert: "all", "largest" or ids.'),
    tracks: Optional[Path] = typer.Option(None, "--tracks", help="Face tracks JSON to use instead of detection."),
    whole_frame: bool = typer.Option(False, "--whole-frame", help="Invert the whole frame instead of face crops."),
    no_adapter_library: bool = NoAdapterLibraryOption,
    device: str = DeviceOption,
    dtype: str = DtypeOption,
    allow_pickle: bool = AllowPickleOption,
    cache_dir: Optional[Path] = CacheOption,
) -> None:
    """DDIM-invert the faces of INPUT into the cache, so later edits of it start at once."""
    from ipfacediff.job import invert_video

    pipe = _pipeline(model, identity_model, identity_lora, None, config, device, dtype, allow_pickle,
                     adapter_library=not no_adapter_library)
    with progress_bars() as progress:
        summary = invert_video(input, pipeline=pipe, source_prompt=source_prompt, resolution=resolution, steps=steps,
                               faces=faces, tracks_path=tracks, whole_frame=whole_frame, cache=_cache(cache_dir),
                               progress=progress)
    for line in summary:
        typer.echo(line)


@app.command()
def batch(
    manifest: Path = typer.Argument(..., help="CSV or JSONL: one row per clip (input, prompt or prompts, settings)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the edited videos and results.jsonl."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: auto or ray://HOST:10001. Default: a local Ray instance."),
    gpus_per_task: float = typer.Option(0.0, "--gpus-per-task", help="GPU share of each worker (0: CPU)."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Also score every output (metrics next to it)."),
    model: Optional[str] = ModelOption,
    workers: Optional[int] = typer.Option(None, "--workers", help="At most this many workers."),
    retries: int = typer.Option(2, "--retries", help="Times a clip is resent after its worker died."),
    dtype: str = DtypeOption,
) -> None:
    """Edit many clips with many prompts on Ray: models loaded once per worker, each clip inverted once."""
    from ipfacediff.batch import run_batch

    with progress_bars() as progress:
        summary = run_batch(manifest, output, address=address, gpus_per_task=gpus_per_task, evaluate=evaluate,
                            model=model, num_workers=workers, retries=retries, dtype=dtype, progress=progress,
                            console=console)
    typer.echo(f"{summary.done} done, {summary.failed} failed, {summary.skipped} skipped; results: {summary.results}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (localhost by default)."),
    port: int = typer.Option(7860, "--port", help="Port to serve on."),
    model: Optional[str] = ModelOption,
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Where uploads and results go (one folder per session)."),
    max_upload_mb: float = typer.Option(200, "--max-upload-mb", help="Largest upload accepted."),
    max_seconds: float = typer.Option(120, "--max-seconds", help="Longest video accepted."),
    device: str = DeviceOption,
    dtype: str = DtypeOption,
) -> None:
    """Serve the web page: upload, pick faces, prompt, preview, download."""
    from ipfacediff.ui import launch

    launch(host, port, model=model, work_dir=work_dir, max_upload_mb=max_upload_mb, max_seconds=max_seconds,
           device=device, dtype=dtype)


@app.command("build-tiny-models")
def build_tiny_models_command(
    directory: Path = typer.Argument(..., help="Folder to write (created)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write a tiny random SD-1.x model set (and a tiny CLIP in DIRECTORY/clip) for tests and trials."""
    from ipfacediff.models import build_tiny_models

    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} exists and is not empty; choose a new folder")
    build_tiny_models(directory, seed=seed)
    typer.echo(f"wrote a tiny model set to {directory}")


@app.command()
def faces(
    input: Path = typer.Argument(..., help="Video to look at."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the face tracks here (JSON)."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a debug preview video (boxes, ids, landmarks, mask)."),
) -> None:
    """Find, track and list the faces of INPUT."""
    from ipfacediff.face import faces_report

    tracks = faces_report(input, json_path, preview)
    if not tracks.tracks:
        typer.echo(f"no face found in {input}")
    for track in tracks.tracks:
        typer.echo(f"face {track.id}: frames {track.frames[0]}-{track.frames[-1]} ({len(track.frames)} of {tracks.frames})")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("outputs/demo"), "--output-dir", help="Where the demo clip and its edit go."),
    prompt: str = typer.Option("a face with eyeglasses", "--prompt", help="The edit to show."),
    steps: int = typer.Option(20, "--steps", help="DDIM steps."),
) -> None:
    """Offline demo on the embedded default: make a sample clip, edit it, say where the result is."""
    from ipfacediff.demo import run_demo

    with progress_bars() as progress:
        lines = run_demo(output_dir, prompt=prompt, steps=steps, progress=progress)
    for line in lines:
        typer.echo(line)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user mistakes into one line and exit code 2."""
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as error:
        console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (click.exceptions.Abort, typer.Abort):
        console.print("aborted", markup=False)
        sys.exit(130)
    except CLICK_ERRORS as error:  # usage errors: click's own message, no traceback
        error.show()
        sys.exit(error.exit_code)
    except (click.exceptions.Exit, typer.Exit) as done:
        sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
