"""The ``ipfacediff`` command line.

A user's mistake (missing file, bad model folder, empty prompt, ...) is a :class:`UserError`:
it is printed as one ``error:`` line on stderr and the command exits with code 2, never with a
traceback.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Optional

import click
import typer
from typer._click import exceptions as typer_click_exceptions
from rich.console import Console

from ipfacediff.errors import UserError
from ipfacediff.files import check_writable
from ipfacediff.progress import progress_bars as rich_progress_bars
from ipfacediff.settings import EditSettings, Settings, check_option, field_type, flag_of
from ipfacediff.training_settings import EditTrainingSettings, IdentityTrainingSettings, TrainingSettings

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
HELP_ERRORS = (click.exceptions.NoArgsIsHelpError, typer_click_exceptions.NoArgsIsHelpError)
LARGEST_CACHE_GB = 1_000_000  # a petabyte: far past any disk, and its bytes fit an integer


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, torchvision notices) would bury our progress bars."""
    import warnings

    # mediapipe 0.10.14 calls a protobuf API that protobuf 4 deprecates, once per graph.
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _silence_native_logging() -> None:
    """mediapipe's and TensorFlow Lite's C++ code log to file descriptor 2 from their own threads,
    up to six lines before an ``error:`` line and a dozen in a normal run, and no flag or variable
    stops all of it (absl writes "All log messages before absl::InitializeLog()" regardless). So
    descriptor 2 is pointed at /dev/null and Python's own stderr (our messages, progress bars,
    tracebacks of real bugs) keeps writing to a copy of the original."""
    import logging

    sys.stderr.flush()
    original = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.close(quiet)
    sys.stderr = os.fdopen(
        original, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace"
    )
    logging.getLogger("absl").setLevel(logging.ERROR)


@app.callback()
def root(
    verbose: bool = typer.Option(
        False, "--verbose", help="Let the libraries' own logging through (mediapipe, TensorFlow Lite)."
    ),
) -> None:
    """Edit the faces in a video from a text prompt, keeping the person recognisable and the video flicker-free."""
    # --verbose is acted on in main(), before any library is imported.


def progress_bars():
    """A rich progress display on stderr; yields progress(stage, done, total) for the library's callbacks."""
    return rich_progress_bars(console)


def setting_option(cls: type[Settings], name: str, **overrides: Any) -> Any:
    """The typer option of one setting, from its declaration (default, flag, help)."""
    f = next(f for f in fields(cls) if f.name == name)
    meta = f.metadata
    names = [flag_of(name, meta) + (f"/{meta['negative']}" if meta.get("negative") else "")]
    if meta.get("short"):
        names.append(meta["short"])
    default = ... if f.default is MISSING else f.default
    return typer.Option(overrides.pop("default", default), *names, help=overrides.pop("help", meta["help"]))


def with_settings(cls: type[Settings]) -> Callable:
    """Give a command every option of ``cls``; the command receives them built into one
    ``settings`` object, checked before the command's body runs."""

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "settings"]
        names = [f.name for f in fields(cls)]
        added = [
            inspect.Parameter(
                n, inspect.Parameter.KEYWORD_ONLY, default=setting_option(cls, n), annotation=field_type(cls, n)
            )
            for n in names
        ]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            settings = cls(**{n: values.pop(n) for n in names})
            return command(settings=settings, **values)

        run.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
        run.__annotations__ = {
            **{k: v for k, v in command.__annotations__.items() if k != "settings"},
            **{p.name: p.annotation for p in added},
        }
        return run

    return decorate


ModelOption = typer.Option(
    None,
    "--model",
    "-m",
    help="SD-1.x model: diffusers folder, hub id (from the local cache when offline) or single .safetensors file. Default: the embedded model set.",
)
IdentityModelOption = typer.Option(
    None,
    "--identity-model",
    help="ε1 as a separate UNet (diffusers model or UNet folder, or hub id). Default: the base UNet.",
)
IdentityLoraOption = typer.Option(
    None, "--identity-lora", help="ε1 as a LoRA adapter (.safetensors, diffusers format) over the base UNet."
)
EditLoraOption = typer.Option(
    None, "--edit-lora", help="ε2 LoRA adapter, PATH or PATH:WEIGHT; repeat for multi-attribute edits."
)
ConfigOption = typer.Option(
    None, "--config", help="Architecture (diffusers folder or cached hub id) for a single-file checkpoint."
)
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
DtypeOption = typer.Option(
    "auto", "--dtype", help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16."
)
AllowPickleOption = typer.Option(
    False, "--allow-pickle", help="Also read pickled .bin/.ckpt weights (they can run code: only for files you trust)."
)
NoAdapterLibraryOption = typer.Option(
    False,
    "--no-adapter-library",
    help="Ignore the ε1/ε2 adapters the model folder ships (ε1 = ε2 = base unless --identity-lora/--edit-lora).",
)
AdaptersDirOption = typer.Option(
    None,
    "--adapters-dir",
    help="An adapter library kept outside the model folder (what `ipfacediff train library --output LIB` wrote), used instead of the model folder's own.",
)
CacheOption = typer.Option(
    None, "--cache-dir", help="Inversion cache folder. Default: $IPFACEDIFF_CACHE or ~/.cache/ipfacediff."
)
CacheMaxOption = typer.Option(
    None,
    "--cache-max-gb",
    help="Keep the inversion cache under this many GB: the entries used longest ago are removed (never the running edit's). Default: no limit.",
)


def _pipeline(
    model,
    identity_model,
    identity_lora,
    edit_lora,
    config,
    device,
    dtype,
    allow_pickle,
    adapter_library=True,
    adapters_dir=None,
):
    from ipfacediff.job import load_pipeline
    from ipfacediff.models import parse_lora_spec

    return load_pipeline(
        model,
        identity_model=identity_model,
        identity_lora=identity_lora,
        edit_loras=[parse_lora_spec(s) for s in edit_lora or []],
        config=config,
        device=device,
        dtype=dtype,
        allow_pickle=allow_pickle,
        adapter_library=adapter_library,
        adapters_dir=adapters_dir,
    )


def _check_outputs(*paths: Optional[Path]) -> None:
    """Every output a command will write, checked before its work (one line if one cannot be)."""
    for path in paths:
        if path is not None:
            check_writable(path)


def _cache_bytes(cache_max_gb: Optional[float]) -> Optional[int]:
    """--cache-max-gb in bytes, checked."""
    if cache_max_gb is None:
        return None
    return int(check_option(cache_max_gb, "--cache-max-gb", low=0, low_open=True, high=LARGEST_CACHE_GB) * 2**30)


def _cache(cache_dir: Optional[Path], cache_max_gb: Optional[float] = None):
    from ipfacediff.diffusion import InversionCache

    return InversionCache(cache_dir / "inversion" if cache_dir else None, max_bytes=_cache_bytes(cache_max_gb))


def _cache_line(cache) -> str:
    """What the inversion cache takes on disk, and its limit."""
    limit = f" of {_size(cache.max_bytes)} allowed" if cache.max_bytes else ""
    return f"inversion cache: {_size(cache.size_bytes())}{limit} in {cache.root}"


def _size(count: int) -> str:
    """Bytes for a person: in GB from 1 GB up, else in MB."""
    return f"{count / 2**30:.2f} GB" if count >= 2**30 else f"{count / 2**20:.1f} MB"


@app.command()
@with_settings(EditSettings)
def edit(
    input: Path = typer.Argument(..., help="Video to edit (any format ffmpeg reads)."),
    output: Path = typer.Option(..., "--output", "-o", help="Edited video to write (.mp4); never the input."),
    model: Optional[str] = ModelOption,
    identity_model: Optional[str] = IdentityModelOption,
    identity_lora: Optional[str] = IdentityLoraOption,
    edit_lora: Optional[list[str]] = EditLoraOption,
    no_adapter_library: bool = NoAdapterLibraryOption,
    adapters_dir: Optional[Path] = AdaptersDirOption,
    config: Optional[str] = ConfigOption,
    tracks: Optional[Path] = typer.Option(
        None, "--tracks", help="Face tracks JSON (the `faces` schema) to use instead of detection."
    ),
    evaluate: bool = typer.Option(
        False, "--evaluate", help="Score the result right after: OUTPUT's .metrics.json and .report.html."
    ),
    clip: Optional[str] = typer.Option(
        None, "--clip", help="With --evaluate: CLIPModel folder or hub id for clip_direction/clip_score."
    ),
    device: str = DeviceOption,
    dtype: str = DtypeOption,
    allow_pickle: bool = AllowPickleOption,
    cache_dir: Optional[Path] = CacheOption,
    cache_max_gb: Optional[float] = CacheMaxOption,
    *,
    settings: EditSettings,
) -> None:
    """Edit the faces of INPUT so they show PROMPT; writes OUTPUT and OUTPUT's .run.json."""
    from ipfacediff.job import check_paths, edit_video, run_metadata_path

    info = check_paths(input, output)  # before the slow model load
    settings.frame_range(info.fps, info.frame_count, times=info.times.seconds())  # so is a range outside the clip
    cache = _cache(cache_dir, cache_max_gb)
    metrics_path, html_path = (
        output.with_name(output.stem + ".metrics.json"),
        output.with_name(output.stem + ".report.html"),
    )
    if evaluate:
        check_writable(metrics_path, what="metrics")
        check_writable(html_path, what="report")
    pipe = _pipeline(
        model,
        identity_model,
        identity_lora,
        edit_lora,
        config,
        device,
        dtype,
        allow_pickle,
        adapter_library=not no_adapter_library,
        adapters_dir=adapters_dir,
    )
    with progress_bars() as progress:
        report = edit_video(
            input,
            output,
            settings,
            pipeline=pipe,
            tracks_path=tracks,
            cache=cache,
            progress=progress,
            log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
        )
    share = report.inversion_reused_share
    reused = (
        " (inversion reused from the cache)"
        if report.inversion_reused
        else f" ({share:.0%} of the inversion reused from the cache)"
        if share
        else ""
    )
    console.print(f"{report.message}{reused} in {report.seconds['total']:.1f} s")
    console.print(_cache_line(cache), markup=False, highlight=False)
    typer.echo(f"wrote {output} and {run_metadata_path(output)}")
    if evaluate:
        _evaluate(
            input,
            output,
            prompt=settings.prompt,
            source_prompt=settings.source_prompt or None,
            clip=clip,
            json_path=metrics_path,
            html_path=html_path,
        )


def _evaluate(original: Path, edited: Path, *, prompt, source_prompt, clip, json_path, html_path) -> dict:
    from ipfacediff.evaluation import evaluate_videos, summary_line, write_html_report, write_metrics_json

    with progress_bars() as progress:
        metrics = evaluate_videos(
            original, edited, prompt=prompt, source_prompt=source_prompt, clip=clip, progress=progress
        )
    typer.echo(summary_line(metrics))
    if json_path:
        typer.echo(f"wrote {write_metrics_json(metrics, json_path)}")
    if html_path:
        typer.echo(f"wrote {write_html_report(metrics, original, edited, html_path)}")
    return metrics


@app.command("evaluate")
def evaluate_command(
    original: Path = typer.Argument(..., help="The video before the edit."),
    edited: Path = typer.Argument(..., help="The edited video (same frames and size)."),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", help="The edit's prompt (default: from the edit's .run.json)."
    ),
    source_prompt: Optional[str] = typer.Option(
        None, "--source-prompt", help='What the input shows (default "a face").'
    ),
    clip: Optional[str] = typer.Option(
        None, "--clip", help="CLIPModel folder or hub id, for clip_direction and clip_score."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the metrics here (JSON)."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
) -> None:
    """Score an edit: identity kept (id_sim, id_drift, tl_id, tg_id), edit made (CLIP), flicker (warp error)."""
    _check_outputs(json_path, html_path)
    _evaluate(
        original,
        edited,
        prompt=prompt,
        source_prompt=source_prompt,
        clip=clip,
        json_path=json_path,
        html_path=html_path,
    )


train_app = typer.Typer(help="Fine-tune ε1 (identity) or ε2 (edit) as LoRA adapters.", no_args_is_help=True)
app.add_typer(train_app, name="train")


IdentityNetOption = typer.Option(
    None,
    "--identity-net",
    help="Identity network of the identity loss: dlib .dat, ArcFace IResNet .pth, or a FaceWorld identity folder. Default: dlib's face net.",
)


def _loss_progress(progress):
    """The trainers report (stage, done, total, loss); the bars take the first three."""
    return lambda stage, done, total, loss=None: progress(stage, done, total)


TrainModelOption = typer.Option(..., "--model", "-m", help="Base SD-1.x model (folder, hub id or .safetensors).")
TrainDataOption = typer.Option(..., "--data", help="Folder of aligned face images, or video(s) to take faces from.")
TrainOutputOption = typer.Option(..., "--output", "-o", help="Folder for the adapter, checkpoints and training.json.")
TrainResumeOption = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUTPUT.")


@train_app.command("identity")
@with_settings(IdentityTrainingSettings)
def train_identity_command(
    model: str = TrainModelOption,
    data: Path = TrainDataOption,
    output: Path = TrainOutputOption,
    resume: bool = TrainResumeOption,
    identity_net: Optional[Path] = IdentityNetOption,
    config: Optional[str] = ConfigOption,
    allow_pickle: bool = AllowPickleOption,
    *,
    settings: IdentityTrainingSettings,
) -> None:
    """Fine-tune ε1 with MSE + λ_id·(1 − cos(ID(x̂0), ID(x0))), prompt ""."""
    from ipfacediff.training import train_identity

    with progress_bars() as progress:
        result = train_identity(
            model,
            data,
            output,
            settings,
            resume=resume,
            identity=identity_net,
            progress=_loss_progress(progress),
            config=config,
            allow_pickle=allow_pickle,
        )
    typer.echo(
        f"trained {result.steps} steps in {result.seconds:.0f} s; adapter: {result.adapter} "
        f"(use it with --identity-lora)"
    )


@train_app.command("edit")
@with_settings(EditTrainingSettings)
def train_edit_command(
    model: str = TrainModelOption,
    source: str = typer.Option(..., "--source", help='What the training faces show, e.g. "a face".'),
    target: str = typer.Option(..., "--target", help='What they should show, e.g. "a face with eyeglasses".'),
    data: Path = TrainDataOption,
    clip: str = typer.Option(..., "--clip", help="CLIPModel folder or hub id for the directional loss."),
    output: Path = TrainOutputOption,
    resume: bool = TrainResumeOption,
    target_images: Optional[Path] = typer.Option(
        None,
        "--target-images",
        help="Example faces showing the target (any people): CLIP's direction is taken from the data's "
        "images to these instead of from --source to --target text.",
    ),
    paired_targets: Optional[Path] = typer.Option(
        None,
        "--paired-targets",
        help="The --data images edited, under the same file names (before/after pairs): each result is "
        "compared with its edited face, and each pair gives CLIP's direction.",
    ),
    identity_net: Optional[Path] = IdentityNetOption,
    config: Optional[str] = ConfigOption,
    allow_pickle: bool = AllowPickleOption,
    *,
    settings: EditTrainingSettings,
) -> None:
    """Fine-tune ε2 with the directional CLIP loss (DiffusionCLIP-style), plus identity and L1 terms."""
    from ipfacediff.training import train_edit

    with progress_bars() as progress:
        result = train_edit(
            model,
            source,
            target,
            data,
            clip,
            output,
            settings,
            target_images=target_images,
            paired_targets=paired_targets,
            resume=resume,
            identity=identity_net,
            progress=_loss_progress(progress),
            config=config,
            allow_pickle=allow_pickle,
        )
    typer.echo(
        f"trained {result.steps} steps in {result.seconds:.0f} s; adapter: {result.adapter} "
        f"(use it with --edit-lora {result.adapter}:1.0)"
    )


@train_app.command("library")
def train_library_command(
    model: str = TrainModelOption,
    data: list[Path] = typer.Option(
        ...,
        "--data",
        help="A video, a photo, or a folder of them (repeatable): every face is detected, aligned and cropped at the model's resolution.",
    ),
    edits: list[str] = typer.Option(
        ...,
        "--edits",
        help='Edits, comma-separated (repeatable): built-in eyeglasses, blonde_hair, beard, smile, or NAME="target prompt".',
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="The library folder: adapters.json, identity/, one folder per edit (use it with --adapters-dir).",
    ),
    identity_net: Optional[Path] = IdentityNetOption,
    clip: Optional[str] = typer.Option(
        None,
        "--clip",
        help="CLIPModel folder or hub id for ε2's directional loss. Default: MODEL/clip when the model folder has one, else openai/clip-vit-base-patch32.",
    ),
    source: str = typer.Option(
        "a face", "--source", help="What the training faces show; each ε2 goes from it to its target prompt."
    ),
    max_steps: Optional[int] = setting_option(
        TrainingSettings,
        "max_steps",
        default=None,
        help="Optimizer steps of each adapter. Default: 500 for ε1, 200 for each ε2.",
    ),
    resolution: Optional[int] = setting_option(TrainingSettings, "resolution"),
    rank: int = setting_option(TrainingSettings, "rank"),
    learning_rate: float = setting_option(TrainingSettings, "learning_rate"),
    max_images: Optional[int] = setting_option(
        TrainingSettings, "max_images", help="At most this many faces, evenly spread over all --data."
    ),
    inversion_steps: int = setting_option(
        EditTrainingSettings, "inversion_steps", help="ε2: DDIM steps inverting each face (to t = 500) once."
    ),
    generation_steps: int = setting_option(
        EditTrainingSettings, "generation_steps", help="ε2: DDIM steps regenerating it in each training step."
    ),
    mixed_precision: str = setting_option(TrainingSettings, "mixed_precision"),
    aligned: bool = typer.Option(
        False, "--aligned", help="The images in --data are aligned face crops already (no detection)."
    ),
    seed: int = setting_option(TrainingSettings, "seed"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a killed run in OUTPUT (finished adapters are kept), or add edits to it."
    ),
    config: Optional[str] = ConfigOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Train ε1 and one ε2 per edit for MODEL into the adapter library OUTPUT (edit with --adapters-dir OUTPUT)."""
    from ipfacediff.adapters import build_library, parse_edits

    steps = {} if max_steps is None else {"max_steps": max_steps}
    common = dict(rank=rank, learning_rate=learning_rate, mixed_precision=mixed_precision, **steps)
    with progress_bars() as progress:
        report = build_library(
            model,
            data,
            parse_edits(edits, source),
            output,
            clip=clip,
            identity_net=identity_net,
            source=source,
            aligned=aligned,
            resolution=resolution,
            max_images=max_images,
            identity_options=common,
            edit_options=dict(common, inversion_steps=inversion_steps, generation_steps=generation_steps),
            seed=seed,
            resume=resume,
            progress=progress,
            log=lambda m: console.print(m, markup=False, highlight=False),
            config=config,
            allow_pickle=allow_pickle,
        )
    names = ", ".join(report.get("edits", {}))
    typer.echo(
        f"wrote {output / 'adapters.json'}: ε1 and {len(report.get('edits', {}))} edit adapter(s) ({names}) "
        f"in {report.get('seconds', 0):.0f} s; edit with --adapters-dir {output}"
    )


faceworld_app = typer.Typer(
    help="FaceWorld: look at it, and train the embedded default models on it.", no_args_is_help=True
)
app.add_typer(faceworld_app, name="faceworld")
faceworld_render_app = typer.Typer(
    help="Draw FaceWorld: a contact sheet, or a scene clip with its ground-truth tracks.", no_args_is_help=True
)
faceworld_app.add_typer(faceworld_render_app, name="render")
FaceworldDeviceOption = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def _one_of(flag: str, value: str, choices) -> str:
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(sorted(choices))}, got {value!r}")
    return value


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--ids must be identity numbers separated by commas, e.g. 3,14; got {text!r}") from None


@faceworld_app.command("train")
def faceworld_train_command(
    output: Path = typer.Argument(..., help="Folder for the model set (empty or new, unless --resume)."),
    preset: str = typer.Option(
        "cpu",
        "--preset",
        help="smoke: seconds (tests); cpu-1h: ~84 min and cpu: ~130 min on 2 cores; gpu: ~4.5 min on one H100.",
    ),
    device: str = FaceworldDeviceOption,
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run a killed process left in OUTPUT, or add the stages a finished run lacks.",
    ),
) -> None:
    """Train the FaceWorld SD-1.x model set (and its CLIP) from scratch."""
    from ipfacediff.faceworld.train import PRESETS, progress_lines, train_faceworld_models

    report = train_faceworld_models(
        output,
        preset=_one_of("--preset", preset, PRESETS),
        device=device,
        seed=seed,
        progress=progress_lines(),
        resume=resume,
    )
    stages = report["stages"]
    typer.echo(
        f"{output}: {report['seconds']['total']:.0f} s on {report['device_name']}; "
        f"CLIP pair accuracy {stages['clip']['held_out_pair_accuracy']:.3f}, "
        f"VAE PSNR {stages['vae']['held_out_psnr_db']:.2f} dB, "
        f"UNet held-out ε-MSE {stages['unet']['held_out_eps_mse']:.4f}, "
        + (f"decoder face PSNR {stages['decoder']['held_out_face_psnr_db']:.2f} dB, " if "decoder" in stages else "")
        + f"{report['weights_total_bytes'] / 1e6:.1f} MB of weights"
    )


@faceworld_app.command("oracles")
def faceworld_oracles_command(
    output: Path = typer.Argument(..., help="Folder for identity/, attributes/ and oracles.json."),
    preset: str = typer.Option(
        "cpu",
        "--preset",
        help="smoke (seconds; the tests), cpu (about 13 min on 2 cores), cpu-large (the gpu preset's wider identity net: about 35 min on one core) or gpu.",
    ),
    device: str = FaceworldDeviceOption,
    seed: int = typer.Option(0, "--seed"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Render processes. Default: the preset's."),
) -> None:
    """Train the identity net and attribute oracle FaceWorld's benchmark scores with."""
    import json
    import time

    from ipfacediff.faceworld.oracles import PRESETS, train_oracles

    started = time.perf_counter()

    def log(message: str) -> None:
        console.print(f"[{time.perf_counter() - started:7.1f}s] {message}", markup=False, highlight=False)

    report = train_oracles(
        output, preset=_one_of("--preset", preset, PRESETS), device=device, seed=seed, progress=log, workers=workers
    )
    identity, attributes = report["identity"]["held_out"], report["attributes"]["held_out"]
    typer.echo(
        json.dumps(
            {
                "output": str(output),
                "seconds": report["seconds"],
                "identity": {
                    k: identity[k]
                    for k in (
                        "mean_cosine_same",
                        "mean_cosine_different",
                        "same_person_threshold",
                        "verification_accuracy",
                        "verification_accuracy_2fold",
                        "auc",
                    )
                },
                "edit_invariance_mean_cosine": {k: v["mean_cosine"] for k, v in identity["edit_invariance"].items()},
                "attribute_accuracy": {k: v["accuracy"] for k, v in attributes["per_attribute"].items()},
                "edit_flag_rate": {k: v["flag_rate"] for k, v in attributes["edit_flag"].items()},
            },
            indent=2,
        )
    )


@faceworld_app.command("adapters")
def faceworld_adapters_command(
    model: Path = typer.Argument(..., help="FaceWorld model folder (from `ipfacediff faceworld train`)."),
    preset: str = typer.Option("cpu", "--preset", help="smoke, cpu or gpu."),
    identity_net: Optional[Path] = typer.Option(
        None, "--identity-net", help="Identity net for the trainers' identity loss. Default: train one (seed + 1)."
    ),
    edits: str = typer.Option(
        "eyeglasses,blonde_hair,beard,smile",
        "--edits",
        help="Comma-separated subset of eyeglasses, blonde_hair, beard, smile.",
    ),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue or complete MODEL/adapters."),
    paired: bool = typer.Option(
        False, "--paired", help="Train each ε2 on before/after renders as well (not the shipped adapters' way)."
    ),
) -> None:
    """Train ε1 and the four ε2 adapters into MODEL/adapters, the library the loader applies."""
    from ipfacediff.faceworld.adapters import PRESETS, train_adapters
    from ipfacediff.faceworld.attributes import EDITS
    from ipfacediff.models import ADAPTER_LIBRARY

    chosen = [e.strip() for e in edits.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in EDITS]
    if unknown:
        raise UserError(f"unknown edit(s) {', '.join(unknown)}: choose from {', '.join(EDITS)}")
    report = train_adapters(
        model,
        preset=_one_of("--preset", preset, PRESETS),
        identity_net=identity_net,
        edits=chosen,
        seed=seed,
        resume=resume,
        paired=paired,
        log=lambda m: console.print(m, markup=False, highlight=False),
    )
    typer.echo(
        f"{model / ADAPTER_LIBRARY}: {report['seconds']:.0f} s, {report['weights_bytes'] / 1e6:.2f} MB of adapters"
    )


@faceworld_render_app.command("sheet")
def faceworld_sheet_command(
    out: Path = typer.Option(Path("faceworld_sheet.png"), "--out", help="The image to write."),
    size: int = typer.Option(64, "--size", help="Side of each face."),
    ids: str = typer.Option("0,1,2,3,4,5,6,7,1000,1001", "--ids", help="Identities, one row each."),
    upscale: int = typer.Option(3, "--upscale", help="Pixel repeat of the whole sheet."),
) -> None:
    """A contact sheet: rows are identities, columns the plain face, each scored edit, old + hat, head turns."""
    from PIL import Image

    from ipfacediff.faceworld.__main__ import SHEET_COLUMNS, contact_sheet

    rows = _ids(ids)
    _check_outputs(out)
    Image.fromarray(contact_sheet(rows, size, upscale)).save(out)
    typer.echo(f"{out}: rows = ids {rows}; columns = {', '.join(SHEET_COLUMNS)}")


@faceworld_render_app.command("clip")
def faceworld_clip_command(
    out: Path = typer.Argument(..., help="The video to write (.mp4)."),
    ids: str = typer.Option("3,14", "--ids", help="The identities in the scene."),
    seed: int = typer.Option(1, "--seed", help="Seed of the motion."),
    frames: int = typer.Option(24, "--frames"),
    size: int = typer.Option(256, "--size", help="Side of the square video."),
    edit: Optional[str] = typer.Option(
        None, "--edit", help="Render the same clip with this edit made: eyeglasses, blonde_hair, beard or smile."
    ),
    tracks: Optional[Path] = typer.Option(
        None, "--tracks", help="The ground-truth tracks (JSON). Default: beside OUT as OUT.json."
    ),
) -> None:
    """A scene clip of moving faces with its ground-truth tracks."""
    from ipfacediff.faceworld import EDITS, render_clip, write_clip

    people = _ids(ids)
    if edit is not None:
        _one_of("--edit", edit, EDITS)
    clip = render_clip(people, seed=seed, frames=frames, size=size)
    if edit:
        clip = clip.with_edit(EDITS[edit])
    video, tracks_path = write_clip(clip, out, tracks or out.with_suffix(".json"))
    typer.echo(f"{video} {tracks_path}")


def faceworld_main(argv: list[str] | None = None) -> None:
    """``python -m ipfacediff.faceworld``: the ``ipfacediff faceworld`` commands under that name."""
    main(argv, command=faceworld_app, prog_name="python -m ipfacediff.faceworld")


@app.command()
def invert(
    input: Path = typer.Argument(..., help="Video whose faces to invert."),
    model: Optional[str] = ModelOption,
    identity_model: Optional[str] = IdentityModelOption,
    identity_lora: Optional[str] = IdentityLoraOption,
    config: Optional[str] = ConfigOption,
    source_prompt: str = setting_option(EditSettings, "source_prompt", help="Inversion prompt."),
    resolution: Optional[int] = setting_option(EditSettings, "resolution"),
    steps: int = setting_option(EditSettings, "steps", help="DDIM inversion steps."),
    faces: str = setting_option(EditSettings, "faces", help='Faces to invert: "all", "largest" or ids.'),
    tracks: Optional[Path] = typer.Option(None, "--tracks", help="Face tracks JSON to use instead of detection."),
    whole_frame: bool = setting_option(
        EditSettings, "whole_frame", help="Invert the whole frame instead of face crops."
    ),
    allow_out_of_domain: bool = setting_option(EditSettings, "allow_out_of_domain"),
    no_adapter_library: bool = NoAdapterLibraryOption,
    adapters_dir: Optional[Path] = AdaptersDirOption,
    device: str = DeviceOption,
    dtype: str = DtypeOption,
    allow_pickle: bool = AllowPickleOption,
    cache_dir: Optional[Path] = CacheOption,
    cache_max_gb: Optional[float] = CacheMaxOption,
) -> None:
    """DDIM-invert the faces of INPUT into the cache, so later edits of it start at once."""
    from ipfacediff.job import invert_video

    # The edit's own checks of the numbers and the face selection; the prompt is the edit's.
    EditSettings(
        prompt="-",
        source_prompt=source_prompt,
        resolution=resolution,
        steps=steps,
        faces=faces,
        whole_frame=whole_frame,
    )
    cache = _cache(cache_dir, cache_max_gb)

    pipe = _pipeline(
        model,
        identity_model,
        identity_lora,
        None,
        config,
        device,
        dtype,
        allow_pickle,
        adapter_library=not no_adapter_library,
        adapters_dir=adapters_dir,
    )
    with progress_bars() as progress:
        summary = invert_video(
            input,
            pipeline=pipe,
            source_prompt=source_prompt,
            resolution=resolution,
            steps=steps,
            faces=faces,
            tracks_path=tracks,
            whole_frame=whole_frame,
            cache=cache,
            progress=progress,
            allow_out_of_domain=allow_out_of_domain,
        )
    for line in summary:
        typer.echo(line)


@app.command()
def batch(
    manifest: Path = typer.Argument(..., help="CSV or JSONL: one row per clip (input, prompt or prompts, settings)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the edited videos and results.jsonl."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster: auto or ray://HOST:10001. Default: a local Ray instance."
    ),
    gpus_per_task: float = typer.Option(0.0, "--gpus-per-task", help="GPU share of each worker (0: CPU)."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Also score every output (metrics next to it)."),
    model: Optional[str] = ModelOption,
    workers: Optional[int] = typer.Option(None, "--workers", help="At most this many workers."),
    retries: int = typer.Option(2, "--retries", help="Times a clip is resent after its worker died."),
    dtype: str = DtypeOption,
    cache_max_gb: Optional[float] = CacheMaxOption,
) -> None:
    """Edit many clips with many prompts on Ray: models loaded once per worker, each clip inverted once."""
    from ipfacediff.batch import run_batch

    with progress_bars() as progress:
        summary = run_batch(
            manifest,
            output,
            address=address,
            gpus_per_task=gpus_per_task,
            evaluate=evaluate,
            model=model,
            num_workers=workers,
            retries=retries,
            dtype=dtype,
            progress=progress,
            console=console,
            cache_max_bytes=_cache_bytes(cache_max_gb),
        )
    typer.echo(f"{summary.done} done, {summary.failed} failed, {summary.skipped} skipped; results: {summary.results}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (localhost by default)."),
    port: int = typer.Option(7860, "--port", help="Port to serve on."),
    model: Optional[str] = ModelOption,
    work_dir: Optional[Path] = typer.Option(
        None, "--work-dir", help="Where uploads and results go (one folder per session)."
    ),
    max_upload_mb: float = typer.Option(200, "--max-upload-mb", help="Largest upload accepted."),
    max_seconds: float = typer.Option(120, "--max-seconds", help="Longest video accepted."),
    keep_minutes: float = typer.Option(
        60,
        "--keep-minutes",
        help="Remove a session's videos and results after this many idle minutes (they are also removed when its tab closes and when the server stops).",
    ),
    adapters_dir: Optional[Path] = AdaptersDirOption,
    device: str = DeviceOption,
    dtype: str = DtypeOption,
) -> None:
    """Serve the web page: upload, pick faces, prompt, preview, download."""
    from ipfacediff.ui import launch

    launch(
        host,
        port,
        model=model,
        work_dir=work_dir,
        max_upload_mb=max_upload_mb,
        max_seconds=max_seconds,
        device=device,
        dtype=dtype,
        keep_minutes=keep_minutes,
        adapters_dir=adapters_dir,
    )


@app.command("build-tiny-models")
def build_tiny_models_command(
    directory: Path = typer.Argument(..., help="Folder to write (created)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write a tiny random SD-1.x model set (and a tiny CLIP in DIRECTORY/clip) for tests and trials."""
    from ipfacediff.models import build_tiny_models

    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a folder; choose a new folder")
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} exists and is not empty; choose a new folder")
    # Where the folder can be made (or written into when it exists empty).
    check_writable(directory / "model_index.json" if directory.exists() else directory, what="model folder")
    build_tiny_models(directory, seed=seed)
    typer.echo(f"wrote a tiny model set to {directory}")


@app.command()
def faces(
    input: Path = typer.Argument(..., help="Video to look at."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the face tracks here (JSON)."),
    preview: Optional[Path] = typer.Option(
        None, "--preview", help="Write a debug preview video (boxes, ids, landmarks, mask)."
    ),
) -> None:
    """Find, track and list the faces of INPUT."""
    from ipfacediff.face import faces_report

    _check_outputs(json_path, preview)

    tracks = faces_report(input, json_path, preview)
    if not tracks.tracks:
        typer.echo(f"no face found in {input}")
    for track in tracks.tracks:
        typer.echo(
            f"face {track.id}: frames {track.frames[0]}-{track.frames[-1]} ({len(track.frames)} of {tracks.frames})"
        )


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


def usage_line(error: click.ClickException) -> str:
    """click's (and typer's) message of a usage error as one line, naming the command and where
    its options are listed: "edit: No such option: --x (see `ipfacediff edit --help`)"."""
    message = " ".join(error.format_message().split())
    context = getattr(error, "ctx", None)
    if context is None:
        return message
    names, level = [], context
    while level.parent is not None:  # the subcommands' names, without the program's
        names.append(level.info_name)
        level = level.parent
    command = " ".join(reversed(names))
    return f"{command + ': ' if command else ''}{message} (see `{context.command_path} --help`)"


def main(argv: list[str] | None = None, *, command: typer.Typer = app, prog_name: str | None = None) -> None:
    """Entry point: run the app (or one of its groups, ``command``, under ``prog_name``), turning
    user mistakes into one line and exit code 2."""
    _quiet_libraries()
    # Only the installed command owns the process's stderr; a caller of main(argv) keeps its own.
    if argv is None and "--verbose" not in sys.argv[1:] and os.environ.get("IPFACEDIFF_VERBOSE", "0") == "0":
        _silence_native_logging()
    try:
        # Without standalone mode click returns an ``Exit``'s code instead of exiting with it.
        code = command(args=argv, prog_name=prog_name, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as error:
        console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (click.exceptions.Abort, typer.Abort):
        console.print("aborted", markup=False)
        sys.exit(130)
    except HELP_ERRORS as error:  # a group named without its command: its help
        error.show()
        sys.exit(error.exit_code)
    except CLICK_ERRORS as error:  # unknown option, bad value, missing option: one line like ours
        console.print(f"error: {usage_line(error)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except (click.exceptions.Exit, typer.Exit) as done:
        sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
