"""The ``ipfacediff`` command line.

A user's mistake (missing file, bad model folder, empty prompt, ...) is a :class:`UserError`:
it is printed as one ``error:`` line on stderr and the command exits with code 2, never with a
traceback.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ipfacediff.errors import UserError
from ipfacediff.files import check_writable
from ipfacediff.progress import progress_bars as rich_progress_bars
from ipfacediff.runner import CLICK_ERRORS, HELP_ERRORS, console, run_command, usage_line  # noqa: F401
from ipfacediff.settings import (
    EditSettings,
    ModelSpec,
    check_option,
    Settings,
    field_type,
    flag_of,
    option_names,
)
from ipfacediff.training_settings import (
    DEFAULT_TUNE_FRAMES,
    DEFAULT_TUNE_STEPS,
    EditTrainingSettings,
    IdentityTrainingSettings,
    TrainingSettings,
)

app = typer.Typer(
    name="ipfacediff",
    help="Edit the faces in a video from a text prompt, keeping the person recognisable and the video flicker-free.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
COMMAND_GROUPS = "ipfacediff.commands"  # entry points: typer groups added as subcommands
LARGEST_CACHE_GB = 1_000_000  # a petabyte: far past any disk, and its bytes fit an integer


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


def with_settings(cls: type[Settings], *, into: str = "settings", only: tuple[str, ...] | None = None) -> Callable:
    """Give a command every option of ``cls`` (or those named in ``only``); the command receives
    them built into one object, its parameter ``into``, checked before the command's body runs. A
    renamed setting's old flag (``cls.renamed``) is still read, with a note naming the new one."""

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != into]
        names = [f.name for f in fields(cls) if only is None or f.name in only]
        added = [
            inspect.Parameter(
                n, inspect.Parameter.KEYWORD_ONLY, default=setting_option(cls, n), annotation=field_type(cls, n)
            )
            for n in names
        ]
        renamed = {old: new for old, new in cls.renamed.items() if new in names}
        aliases = [
            inspect.Parameter(
                old,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "/".join(_switch_flags(cls, old)), hidden=True),
                annotation=Optional[bool],
            )
            for old in renamed
        ]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for old, new in renamed.items():
                value = values.pop(old)
                if value is not None:
                    typed, now = (_switch_flags(cls, name)[0 if value else -1] for name in (old, new))
                    console.print(f"note: {typed} is now {now}", markup=False, highlight=False, soft_wrap=True)
                    values[new] = value
            built = cls(**{n: values.pop(n) for n in names})
            return command(**{into: built}, **values)

        run.__signature__ = inspect.Signature([*own, *added, *aliases])  # type: ignore[attr-defined]
        run.__annotations__ = {
            **{k: v for k, v in command.__annotations__.items() if k != into},
            **{p.name: p.annotation for p in [*added, *aliases]},
        }
        return run

    return decorate


def _switch_flags(cls: type[Settings], name: str) -> list[str]:
    """A switch's flags, on form first: ``--feature-injection``, ``--no-feature-injection`` (an old
    name, no longer a field, has the same pair built from the name)."""
    known = {f.name: f.metadata for f in fields(cls)}
    if name in known:
        return option_names(name, known[name]).split("/")
    flag = "--" + name.replace("_", "-")
    return [flag, "--no-" + flag.removeprefix("--")]


MODEL_ONLY = ("model", "adapters_dir", "device", "dtype")  # the web page's model options
ConfigOption = setting_option(ModelSpec, "config")  # the trainers' model options
AllowPickleOption = setting_option(ModelSpec, "allow_pickle")
CacheOption = typer.Option(
    None, "--cache-dir", help="Inversion cache folder. Default: $IPFACEDIFF_CACHE or ~/.cache/ipfacediff."
)
CacheMaxOption = typer.Option(
    None,
    "--cache-max-gb",
    help="Keep the inversion cache under this many GB: the entries used longest ago are removed (never the running edit's). Default: no limit.",
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
    max_bytes = _cache_bytes(cache_max_gb)  # checked before the import, which brings torch
    from ipfacediff.diffusion import InversionCache

    return InversionCache(cache_dir / "inversion" if cache_dir else None, max_bytes=max_bytes)


def _cache_line(cache) -> str:
    """What the inversion cache takes on disk, and its limit."""
    limit = f" of {_size(cache.max_bytes)} allowed" if cache.max_bytes else ""
    return f"inversion cache: {_size(cache.size_bytes())}{limit} in {cache.root}"


def _size(count: int) -> str:
    """Bytes for a person: in GB from 1 GB up, else in MB."""
    return f"{count / 2**30:.2f} GB" if count >= 2**30 else f"{count / 2**20:.1f} MB"


@app.command()
@with_settings(ModelSpec, into="spec")
@with_settings(EditSettings)
def edit(
    input: Path = typer.Argument(..., help="Video to edit (any format ffmpeg reads)."),
    output: Path = typer.Option(..., "--output", "-o", help="Edited video to write (.mp4); never the input."),
    tracks: Optional[Path] = typer.Option(
        None, "--tracks", help="Face tracks JSON (the `faces` schema) to use instead of detection."
    ),
    evaluate: bool = typer.Option(
        False, "--evaluate", help="Score the result right after: OUTPUT's .metrics.json and .report.html."
    ),
    clip: Optional[str] = typer.Option(
        None, "--clip", help="With --evaluate: CLIPModel folder or hub id for clip_direction/clip_score."
    ),
    cache_dir: Optional[Path] = CacheOption,
    cache_max_gb: Optional[float] = CacheMaxOption,
    *,
    settings: EditSettings,
    spec: ModelSpec,
) -> None:
    """Edit the faces of INPUT so they show PROMPT; writes OUTPUT and OUTPUT's .run.json."""
    from ipfacediff.runs import check_paths, run_metadata_path

    info = check_paths(input, output)  # before the slow imports and the model load
    settings.frame_range(info.fps, info.frame_count, times=info.times.seconds())  # so is a range outside the clip
    cache = _cache(cache_dir, cache_max_gb)
    from ipfacediff.service import EditService

    metrics_path, html_path = (
        output.with_name(output.stem + ".metrics.json"),
        output.with_name(output.stem + ".report.html"),
    )
    if evaluate:
        check_writable(metrics_path, what="metrics")
        check_writable(html_path, what="report")
    with progress_bars() as progress:
        result = EditService().edit(
            input,
            output,
            settings,
            spec,
            tracks=tracks,
            cache=cache,
            progress=progress,
            log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
            evaluate=evaluate,
            clip=clip,
            metrics_path=metrics_path,
            report_path=html_path,
        )
    report = result.report
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
    if result.evaluation is not None:
        _said(result.evaluation)


def _said(evaluation) -> None:
    """An evaluation's summary line and the files it wrote."""
    from ipfacediff.evaluation import summary_line

    typer.echo(summary_line(evaluation.metrics))
    for path in (evaluation.metrics_path, evaluation.report_path):
        if path:
            typer.echo(f"wrote {path}")


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
    from ipfacediff.service import EditService

    with progress_bars() as progress:
        evaluation = EditService().evaluate(
            original,
            edited,
            prompt=prompt,
            source_prompt=source_prompt,
            clip=clip,
            metrics_path=json_path,
            report_path=html_path,
            progress=progress,
        )
    _said(evaluation)


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
    from ipfacediff.service import EditService

    with progress_bars() as progress:
        result = EditService.train(
            "identity",
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
    from ipfacediff.service import EditService

    with progress_bars() as progress:
        result = EditService.train(
            "edit",
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
    tune: bool = typer.Option(
        False,
        "--tune",
        help="Measure each edit's weight, guidance and blend threshold on faces of --data kept from training "
        "(CLIP edit score and identity, as `evaluate` scores them) and write the chosen values.",
    ),
    tune_grid: Optional[str] = typer.Option(
        None,
        "--tune-grid",
        help='The values --tune tries, e.g. "weight=0.5,1;guidance=5,7.5;blend_threshold=0.3,0.5" (a value not '
        "named keeps its default list: weight 0.3,0.6,1; guidance 5,7.5; blend_threshold 0.3,0.5).",
    ),
    tune_frames: int = typer.Option(
        DEFAULT_TUNE_FRAMES, "--tune-frames", min=1, help="--tune: faces of --data kept from training to measure on."
    ),
    tune_steps: int = typer.Option(
        DEFAULT_TUNE_STEPS, "--tune-steps", min=1, max=1000, help="--tune: DDIM steps of each trial edit."
    ),
    config: Optional[str] = ConfigOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Train ε1 and one ε2 per edit for MODEL into the adapter library OUTPUT (edit with --adapters-dir OUTPUT)."""
    if tune_grid is not None and not tune:
        raise UserError("--tune-grid is the grid of --tune: pass --tune too")
    from ipfacediff.adapters import parse_edits
    from ipfacediff.adapters.tune import TuneGrid
    from ipfacediff.service import EditService

    grid = TuneGrid.parse(tune_grid) if tune else None

    steps = {} if max_steps is None else {"max_steps": max_steps}
    common = dict(rank=rank, learning_rate=learning_rate, mixed_precision=mixed_precision, **steps)
    with progress_bars() as progress:
        report = EditService.train(
            "library",
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
            tune=grid,
            tune_frames=tune_frames,
            tune_steps=tune_steps,
            progress=progress,
            log=lambda m: console.print(m, markup=False, highlight=False),
            config=config,
            allow_pickle=allow_pickle,
        )
    for name, record in report.get("edits", {}).items() if grid else ():
        chosen = record.get("tuned_scores") or {}
        typer.echo(
            f"{name}: weight {record['weight']}, guidance {record['guidance']}, blend threshold "
            f"{record['blend_threshold']} (clip_direction {chosen.get('clip_direction')}, id_sim {chosen.get('id_sim')})"
        )
    names = ", ".join(report.get("edits", {}))
    typer.echo(
        f"wrote {output / 'adapters.json'}: ε1 and {len(report.get('edits', {}))} edit adapter(s) ({names}) "
        f"in {report.get('seconds', 0):.0f} s; edit with --adapters-dir {output}"
    )


def add_plugin_groups(parent: typer.Typer) -> None:
    """Attach the command groups other packages register as ``ipfacediff.commands`` entry points
    (FaceWorld's ``ipfacediff faceworld``): the CLI names no plug-in. Once per ``parent``."""
    from importlib.metadata import entry_points

    attached = {group.name for group in parent.registered_groups}
    for entry in sorted(entry_points(group=COMMAND_GROUPS), key=lambda e: e.name):
        if entry.name not in attached:
            parent.add_typer(entry.load(), name=entry.name)


def names_a_command_of_its_own(parent: typer.Typer, argv: list[str]) -> bool:
    """Whether ``argv``'s first word names one of ``parent``'s own commands or groups. A plug-in
    group imports its package (FaceWorld's brings diffusers and torch: seconds), which a mistake
    typed into ``ipfacediff edit`` should not wait for; help and anything else attach them."""
    first = next((word for word in argv if not word.startswith("-")), None)
    own = {command.name or command.callback.__name__.replace("_", "-") for command in parent.registered_commands}
    return first in own | {group.name for group in parent.registered_groups}


@app.command()
@with_settings(ModelSpec, into="spec", only=tuple(f.name for f in fields(ModelSpec) if f.name != "edit_loras"))
def invert(
    input: Path = typer.Argument(..., help="Video whose faces to invert."),
    source_prompt: str = setting_option(EditSettings, "source_prompt", help="Inversion prompt."),
    resolution: Optional[int] = setting_option(EditSettings, "resolution"),
    steps: int = setting_option(EditSettings, "steps", help="DDIM inversion steps."),
    faces: str = setting_option(EditSettings, "faces", help='Faces to invert: "all", "largest" or ids.'),
    tracks: Optional[Path] = typer.Option(None, "--tracks", help="Face tracks JSON to use instead of detection."),
    whole_frame: bool = setting_option(
        EditSettings, "whole_frame", help="Invert the whole frame instead of face crops."
    ),
    allow_out_of_domain: bool = setting_option(EditSettings, "allow_out_of_domain"),
    cache_dir: Optional[Path] = CacheOption,
    cache_max_gb: Optional[float] = CacheMaxOption,
    *,
    spec: ModelSpec,
) -> None:
    """DDIM-invert the faces of INPUT into the cache, so later edits of it start at once."""
    from ipfacediff.service import EditService

    # The edit's own checks of the numbers and the face selection; the prompt is the edit's.
    settings = EditSettings(
        prompt="-",
        source_prompt=source_prompt,
        resolution=resolution,
        steps=steps,
        faces=faces,
        whole_frame=whole_frame,
        allow_out_of_domain=allow_out_of_domain,
    )
    cache = _cache(cache_dir, cache_max_gb)
    with progress_bars() as progress:
        summary = EditService().invert(input, spec, settings, tracks=tracks, cache=cache, progress=progress)
    for line in summary:
        typer.echo(line)


@app.command()
@with_settings(ModelSpec, into="spec", only=("model", "dtype"))
def batch(
    manifest: Path = typer.Argument(..., help="CSV or JSONL: one row per clip (input, prompt or prompts, settings)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the edited videos and results.jsonl."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster: auto or ray://HOST:10001. Default: a local Ray instance."
    ),
    gpus_per_task: float = typer.Option(0.0, "--gpus-per-task", help="GPU share of each worker (0: CPU)."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Also score every output (metrics next to it)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="At most this many workers."),
    retries: int = typer.Option(2, "--retries", help="Times a clip is resent after its worker died."),
    cache_max_gb: Optional[float] = CacheMaxOption,
    *,
    spec: ModelSpec,
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
            model=spec.model,
            num_workers=workers,
            retries=retries,
            dtype=spec.dtype,
            progress=progress,
            console=console,
            cache_max_bytes=_cache_bytes(cache_max_gb),
        )
    typer.echo(f"{summary.done} done, {summary.failed} failed, {summary.skipped} skipped; results: {summary.results}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@with_settings(ModelSpec, into="spec", only=MODEL_ONLY)
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (localhost by default)."),
    port: int = typer.Option(7860, "--port", help="Port to serve on."),
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
    *,
    spec: ModelSpec,
) -> None:
    """Serve the web page: upload, pick faces, prompt, preview, download."""
    from ipfacediff.ui import launch

    launch(
        host,
        port,
        model=spec.model,
        work_dir=work_dir,
        max_upload_mb=max_upload_mb,
        max_seconds=max_seconds,
        device=spec.device,
        dtype=spec.dtype,
        keep_minutes=keep_minutes,
        adapters_dir=spec.adapters_dir,
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
    model: Optional[Path] = typer.Option(
        None,
        "--model",
        help="With --preview: a model folder whose card names an occluder segmenter (the embedded default: "
        "ipfacediff/assets/faceworld); its regions join the occlusion mask, as in an edit with it. Only the card "
        "is read: the in-domain check an edit makes is not.",
    ),
) -> None:
    """Find, track and list the faces of INPUT."""
    from ipfacediff.face import faces_report

    _check_outputs(json_path, preview)
    segmenter = None
    if model is not None:
        from ipfacediff.domain import ModelCard
        from ipfacediff.models.segmenter import load_occluder_segmenter

        if preview is None:
            raise UserError("--model is for --preview's occlusion mask; add --preview PATH")
        card = ModelCard.read(model)
        if card is None or card.occluder_segmenter is None:
            raise UserError(f"{model} names no occluder segmenter in its card (ipfacediff.json); leave --model out")
        segmenter = load_occluder_segmenter(card.occluder_segmenter)

    tracks = faces_report(input, json_path, preview, segmenter)
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


def main(argv: list[str] | None = None, *, command: typer.Typer = app, prog_name: str | None = None) -> None:
    """Entry point: run the app (or one of its groups, ``command``, under ``prog_name``), turning
    user mistakes into one line and exit code 2."""
    if command is app and not names_a_command_of_its_own(app, sys.argv[1:] if argv is None else argv):
        add_plugin_groups(app)
    run_command(command, argv, prog_name=prog_name)


if __name__ == "__main__":
    main()
