"""FaceWorld's command group: ``ipfacediff faceworld ...`` (an ``ipfacediff.commands`` entry point)
and ``python -m faceworld ...``, run by the core's runner so that mistakes are one line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipfacediff.errors import UserError
from ipfacediff.files import check_writable, check_writable_folder
from ipfacediff.runner import console, run_command

app = typer.Typer(
    help="FaceWorld: look at it, and train the embedded default models on it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
render_app = typer.Typer(
    help="Draw FaceWorld: a contact sheet, or a scene clip with its ground-truth tracks.", no_args_is_help=True
)
app.add_typer(render_app, name="render")
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def _one_of(flag: str, value: str, choices) -> str:
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(sorted(choices))}, got {value!r}")
    return value


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--ids must be identity numbers separated by commas, e.g. 3,14; got {text!r}") from None


@app.command("train")
def train_command(
    output: Path = typer.Argument(..., help="Folder for the model set (empty or new, unless --resume)."),
    preset: str = typer.Option(
        "cpu",
        "--preset",
        help="smoke: seconds (tests); cpu-1h: ~84 min and cpu: ~130 min on 2 cores; gpu: ~4.5 min on one H100.",
    ),
    device: str = DeviceOption,
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run a killed process left in OUTPUT, or add the stages a finished run lacks.",
    ),
) -> None:
    """Train the FaceWorld SD-1.x model set (and its CLIP) from scratch."""
    from faceworld.train import PRESETS, progress_lines, train_faceworld_models

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


@app.command("oracles")
def oracles_command(
    output: Path = typer.Argument(..., help="Folder for identity/, attributes/ and oracles.json."),
    preset: str = typer.Option(
        "cpu",
        "--preset",
        help="smoke (seconds; the tests), cpu (about 13 min on 2 cores), cpu-large (the gpu preset's wider identity net: about 35 min on one core) or gpu.",
    ),
    device: str = DeviceOption,
    seed: int = typer.Option(0, "--seed"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Render processes. Default: the preset's."),
) -> None:
    """Train the identity net and attribute oracle FaceWorld's benchmark scores with."""
    import json
    import time

    from faceworld.oracles import PRESETS, train_oracles

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


@app.command("segmenter")
def segmenter_command(
    model: Path = typer.Argument(..., help="The model set folder: the segmenter goes to its occluder_segmenter/."),
    steps: int = typer.Option(5000, "--steps", min=1, help="Training steps of 24 crops (about 12 min on one core)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train the occluder segmenter the model set's card names (what is held still in front of a face)."""
    from faceworld.segmenter import train_faceworld_segmenter
    from faceworld.train import progress_lines

    if not model.is_dir():
        raise UserError(f"{model} is not a model folder")
    check_writable_folder(model, "model folder")
    typer.echo(str(train_faceworld_segmenter(model, steps=steps, seed=seed, progress=progress_lines())))


@app.command("adapters")
def adapters_command(
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
    from faceworld.adapters import PRESETS, train_adapters
    from faceworld.attributes import EDITS
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


@render_app.command("sheet")
def sheet_command(
    out: Path = typer.Option(Path("faceworld_sheet.png"), "--out", help="The image to write."),
    size: int = typer.Option(64, "--size", help="Side of each face."),
    ids: str = typer.Option("0,1,2,3,4,5,6,7,1000,1001", "--ids", help="Identities, one row each."),
    upscale: int = typer.Option(3, "--upscale", help="Pixel repeat of the whole sheet."),
) -> None:
    """A contact sheet: rows are identities, columns the plain face, each scored edit, old + hat, head turns."""
    from PIL import Image

    from faceworld.sheet import SHEET_COLUMNS, contact_sheet

    rows = _ids(ids)
    check_writable(out)
    Image.fromarray(contact_sheet(rows, size, upscale)).save(out)
    typer.echo(f"{out}: rows = ids {rows}; columns = {', '.join(SHEET_COLUMNS)}")


@render_app.command("clip")
def clip_command(
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
    occluder: Optional[str] = typer.Option(
        None,
        "--occluder",
        help="Put something in front of the first face: hand (passing across the eyes), microphone (at the "
        "mouth), cup (raised to the mouth) or object (a board passing across, hiding the face for a few frames). "
        "Comma-separated for several.",
    ),
    occluder_mask: Optional[Path] = typer.Option(
        None,
        "--occluder-mask",
        help="The occluders' true coverage (npz: masks, face_coverage, kinds). Default with --occluder: beside OUT "
        "as OUT.occluder.npz.",
    ),
) -> None:
    """A scene clip of moving faces with its ground-truth tracks (and occluders with their masks)."""
    from faceworld import EDITS, OCCLUDER_KINDS, render_clip, write_clip

    people = _ids(ids)
    if edit is not None:
        _one_of("--edit", edit, EDITS)
    kinds = [_one_of("--occluder", k.strip(), OCCLUDER_KINDS) for k in (occluder or "").split(",") if k.strip()]
    if occluder_mask is not None and not kinds:
        raise UserError("--occluder-mask needs --occluder")
    mask_path = (occluder_mask or out.with_suffix(".occluder.npz")) if kinds else None
    for path in (out, mask_path):
        if path is not None:
            check_writable(path)
    clip = render_clip(people, seed=seed, frames=frames, size=size, occluders=kinds)
    if edit:
        clip = clip.with_edit(EDITS[edit])
    video, tracks_path = write_clip(clip, out, tracks or out.with_suffix(".json"), mask_path)
    typer.echo(" ".join(str(p) for p in (video, tracks_path, mask_path) if p is not None))


def main(argv: list[str] | None = None, *, prog_name: str = "python -m faceworld") -> None:
    """``python -m faceworld``: the ``ipfacediff faceworld`` commands under that name."""
    run_command(app, argv, prog_name=prog_name)
