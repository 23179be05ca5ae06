"""One command builds the adapter library of any SD-1.x model: ε1 and one ε2 per edit.

IP-FaceDiff fine-tunes two copies of the base model once: ε1 with an identity loss on the faces
it will edit, ε2 once per attribute with a directional CLIP loss. :func:`build_library` runs the
project's own trainers (:func:`ipfacediff.training.train_identity`,
:func:`ipfacediff.training.train_edit`) for all of them and writes a library folder that the
loader reads (``--adapters-dir LIB``, or ``MODEL/adapters`` inside a model folder)::

    ipfacediff train library --model M --data DIR_OR_VIDEO [--data ...] \\
        --edits eyeglasses,blonde_hair,beard,smile[,NAME="target prompt"] --output LIB \\
        [--identity-net ...] [--clip ...] [--max-steps N] [--resume]

    LIB/adapters.json          the library (adapters.AdapterLibrary), written last
    LIB/training.json          what was trained: settings, seconds, losses per adapter
    LIB/identity/              ε1: pytorch_lora_weights.safetensors and its trainer's training.json
    LIB/<edit>/                one ε2 per edit, the same two files

Every ``--data`` (a video, a photo, or a folder of them) goes through the face module first:
faces are detected, tracked, aligned and cropped at the model's resolution, all of them before
any training, so a bad ``--data`` is one error line at once; the crops are kept in
``LIB/train_data`` until the library is complete. A killed run continues with ``--resume``:
finished adapters are skipped, the unfinished one continues from its trainer's last checkpoint.

An edit is a built-in name (:data:`~ipfacediff.adapters.edits.BUILTIN_EDITS`: a target prompt and
the prompt words that ask for it) or ``NAME="target prompt"``, whose words come from its name and
prompt (:func:`~ipfacediff.adapters.words.derive_words`). Its values (weight, guidance, blend
threshold, identity gradient) are neutral (the edit's settings' defaults) unless the model's card
names FaceWorld's domain, where they are FaceWorld's table; ``tune`` measures them on the model
instead (:mod:`~ipfacediff.adapters.tune`). adapters.json says which (``values_from``).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from ipfacediff.adapters.edits import (
    IDENTITY,
    IDENTITY_NET_DIR,
    SOURCE_PROMPT,
    TABLE_DOMAIN,
    WORK_DIR,
    parse_edits,
)
from ipfacediff.adapters.record import (
    ADAPTER_LIBRARY,
    VALUES_FACEWORLD,
    VALUES_NEUTRAL,
    VALUES_TUNED,
    AdapterEntry,
    AdapterLibrary,
)
from ipfacediff.adapters.tune import DEFAULT_TUNE_FRAMES, DEFAULT_TUNE_STEPS, RULE, TuneGrid
from ipfacediff.errors import UserError
from ipfacediff.files import check_writable_folder, write_json
from ipfacediff.models import library_versions
from ipfacediff.training import (
    ADAPTER_FILE,
    evenly_spaced,
    load_training_faces,
    train_edit,
    train_identity,
    training_files,
)
from ipfacediff.training_settings import EditTrainingSettings, IdentityTrainingSettings, TrainingSettings

LibraryProgress = Callable[[str, int, int], None]
"""progress(stage, done, total): "faces <data>" while faces are found, "adapters" (adapters
finished of those to train), and "<adapter> faces|invert|train" from each trainer."""

LIBRARY_FILE = ADAPTER_LIBRARY.name  # adapters.json
REPORT_FILE = "training.json"
S = TypeVar("S", bound=TrainingSettings)
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
_TUNE = "tune"  # the face set of --data that holds the faces tuning measures on (not an adapter)


@dataclass
class _FaceSet:
    """The training faces of some adapters: a folder the trainers read, checked or extracted."""

    sources: tuple[str, ...]
    folder: Path | None = None  # the trainers' data; set when staged (or for a ready folder of crops)
    faces: np.ndarray | None = None  # extracted, waiting to be staged
    direct: bool = False  # a folder of aligned crops used as it is (the trainers apply max_images)
    count: int = 0  # faces in it
    key: dict = field(default_factory=dict)
    held_out: int = 0  # faces of it kept from training, for --tune to measure on
    held_faces: np.ndarray | None = None  # those faces (loaded or extracted)


def finished_adapters(output: str | Path) -> set[str]:
    """The adapters of a library folder that are finished: recorded in its training.json and their
    adapter file there."""
    output = Path(output)
    report = _read_report(output)
    return {name for name in report.get("steps", {}) if (output / name / ADAPTER_FILE).is_file()} if report else set()


def _read_report(output: Path) -> dict | None:
    path = output / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is damaged (not JSON): remove {output} and build the library again") from None
    return report if isinstance(report, dict) else None


def build_library(
    model: str,
    data: Sequence[str | Path] | None,
    edits: Sequence[AdapterEntry | str] | str,
    output: str | Path,
    *,
    clip: str | None = None,
    identity_net=None,
    source: str = SOURCE_PROMPT,
    aligned: bool = False,
    resolution: int | None = None,
    max_images: int | None = None,
    identity_options: dict | None = None,
    edit_options: dict | None = None,
    edit_data: dict[str, str | Path] | None = None,
    paired_targets: dict[str, str | Path] | None = None,
    seed: int = 0,
    resume: bool = False,
    values: str = "auto",
    tune: TuneGrid | str | bool | None = None,
    tune_frames: int = DEFAULT_TUNE_FRAMES,
    tune_steps: int = DEFAULT_TUNE_STEPS,
    report_extra: dict | None = None,
    progress: LibraryProgress | None = None,
    log: Callable[[str], None] | None = None,
    config: str | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Train ε1 and one ε2 per edit for ``model`` into the library folder ``output``; returns the
    report written to ``output/training.json``.

    ``data``: videos, photos or folders of them (every face detected, aligned and cropped at the
    model's resolution; ``aligned``: images are aligned face crops already). ``edits``: built-in
    names, ``NAME=prompt`` strings or :class:`AdapterEntry`. ``clip``: the CLIPModel of ε2's
    directional loss (default ``MODEL/clip`` when the model folder has one, else
    :data:`DEFAULT_CLIP`). ``identity_net``: an IdentityEncoder or what
    ``IdentityEncoder.from_pretrained`` reads (None: dlib's net). ``identity_options`` /
    ``edit_options``: fields of IdentityTrainingSettings / EditTrainingSettings (max_steps, rank,
    ...; one checkpoint is kept unless ``keep_checkpoints`` says otherwise).
    ``edit_data``: another ``data`` for some edits (a folder or a list), ``paired_targets``: a
    before/after folder per edit (train_edit's). ``resume``: continue or complete ``output``
    (finished adapters are skipped, edits may be added); without it, an existing non-empty
    ``output`` is an error. ``values``: what the edits' values start from, the ``values_from`` mark
    of adapters.json: "neutral" (none: the edit's settings' defaults), "auto" (the entries' own
    values, FaceWorld's table for built-in edits, when the model's card names FaceWorld's domain,
    else neutral), or another mark, kept with the entries' own values (FaceWorld's build passes
    "faceworld"). ``tune``: a :class:`~ipfacediff.adapters.tune.TuneGrid` (or its ``--tune-grid``
    text; True: the default grid) to measure each edit's weight, guidance and blend threshold on
    ``tune_frames`` faces of ``data`` kept from training, each trial edit of ``tune_steps`` steps;
    the chosen values and every point's scores are written (adapters.json, training.json).
    ``report_extra``: keys the report starts with.
    ``config`` / ``allow_pickle``: how ``model`` loads, as :func:`~ipfacediff.models.load_model_set`'s.

    Everything that can be wrong with the arguments (the model, the data, the CLIP model, the
    identity net, the edits) is one UserError line before any training starts. ``adapters.json``
    is written last, so a killed run never leaves one that names missing files.
    """
    started = time.perf_counter()
    log = log or (lambda _message: None)
    grid = (
        None
        if tune is None or tune is False
        else tune
        if isinstance(tune, TuneGrid)
        else TuneGrid.parse(tune if isinstance(tune, str) else None)
    )
    if grid is not None and not (isinstance(tune_frames, int) and tune_frames >= 1):
        raise UserError(f"--tune-frames must be at least 1, got {tune_frames!r}")
    edits = _starting_values(_edit_entries(edits, source), model, values)
    output = _library_folder(output, resume)
    run = _LibraryRun(
        model=model,
        source=source,
        edits=edits,
        identity_settings=_trainer_settings(IdentityTrainingSettings, identity_options, resolution, max_images),
        edit_settings=_trainer_settings(EditTrainingSettings, edit_options, resolution, max_images),
        clip=clip,
        identity_net=identity_net,
        resolution=resolution,
        max_images=max_images,
        seed=seed,
        paired_targets=paired_targets or {},
        config=config,
        allow_pickle=allow_pickle,
        progress=progress,
        log=log,
    )

    report = _read_report(output) or {}
    if resume and not report:
        _nothing_to_resume(output, log)
    _check_resume(output, report, model=model, source=source, edits=edits)
    held_out = _held_out_count(output, report, grid, tune_frames)
    recorded = _recorded_edits(report, edits)
    finished = finished_adapters(output)
    todo = [name for name in [IDENTITY, *(e.name for e in edits)] if name not in finished]
    library_file = output / LIBRARY_FILE
    tuned = grid is None or _tuned_already(report, recorded, edits, grid, tune_steps)
    if (
        not todo
        and tuned
        and library_file.is_file()
        and _library(report, recorded, finished) == _read_json(library_file)
    ):
        log(f"{library_file}: every adapter is trained{' and tuned' if grid else ''} already")
        return report

    check_writable_folder(output, what="--output")  # not a PermissionError after the faces are found
    sets = (
        run.prepare(todo, data, edit_data or {}, aligned=aligned, output=output, held_out=held_out, tune=not tuned)
        if todo or not tuned
        else {}
    )
    _start_report(report, output, run, sets, recorded=recorded, todo=todo, report_extra=report_extra)
    for done, name in enumerate(todo):
        if progress:
            progress("adapters", done, len(todo))
        report["steps"][name] = run.train(name, sets[name], output)
        report["seconds"] = round(report.get("seconds", 0.0) + time.perf_counter() - started, 1)
        started = time.perf_counter()
        write_json(output / REPORT_FILE, report)
    if progress and todo:
        progress("adapters", len(todo), len(todo))
    if not tuned:
        _complete_library(output, report, run, recorded=recorded, started=started, keep_work=True)
        started = time.perf_counter()
        _tune_library(output, report, run, recorded, sets[_TUNE], grid, tune_steps)
    _complete_library(output, report, run, recorded=recorded, started=started)
    return report


def _edit_entries(edits: Sequence[AdapterEntry | str] | str, source: str) -> list[AdapterEntry]:
    """Every way of naming edits (one string, strings, entries) as entries, each edit once: two
    adapters of one name would overwrite each other's folder."""
    entries = (
        parse_edits(edits, source)
        if isinstance(edits, str)
        else [e for item in edits for e in ([item] if isinstance(item, AdapterEntry) else parse_edits(item, source))]
    )
    if len({e.name for e in entries}) != len(entries):
        raise UserError("an edit is named twice: give each edit once")
    return entries


def _library_folder(output: str | Path, resume: bool) -> Path:
    """The library folder, refused when it is a file or holds files and ``resume`` was not asked
    for: a finished library is never overwritten by mistake."""
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file: it names the library folder to write")
    if output.is_dir() and any(output.iterdir()) and not resume:
        raise UserError(
            f"{output} exists: pass --resume to continue or complete it (or add edits to it), "
            "or choose another --output"
        )
    return output


def _recorded_edits(report: dict, edits: list[AdapterEntry]) -> dict:
    """The edits of the library after this run: those recorded before, then the new ones; an edit
    asked again keeps its place and takes its (re)derived words and values."""
    recorded = dict(report.get("edits", {}))
    for edit in edits:
        before = recorded.get(edit.name) or {}
        if before.get("values_from") == VALUES_TUNED and before.get("target") == edit.target:
            continue  # measured on this model: asked again (resumed), it keeps what was measured
        recorded[edit.name] = edit.to_record()
    return recorded


def _starting_values(edits: list[AdapterEntry], model: str, values: str) -> list[AdapterEntry]:
    """The edits with the values a library starts from (see :func:`build_library`'s ``values``).
    FaceWorld's table is FaceWorld's: another model's best weight, guidance and blend threshold
    are its own, so it starts from the edit's settings' defaults, which suit any model as they
    suit an edit without a library."""
    if values == "auto":
        values = VALUES_FACEWORLD if _card_domain(model) == TABLE_DOMAIN else VALUES_NEUTRAL
    if values == VALUES_NEUTRAL:
        return [e.without_tuned_values() for e in edits]
    return [
        dataclasses.replace(e, values_from=values) if e.has_tuned_values() else e.without_tuned_values() for e in edits
    ]


def _card_domain(model: str) -> str | None:
    """The domain the model's card (``MODEL/ipfacediff.json``) names; None without one."""
    from ipfacediff.domain import ModelCard

    card = ModelCard.read(model)
    return card.domain if card is not None else None


@dataclass
class _LibraryRun:
    """What every adapter of one run is trained with. ``prepare`` fills in what needs the models
    (the image side, the CLIP model, the identity encoder), only when something is left to train."""

    model: str
    source: str
    edits: list[AdapterEntry]
    identity_settings: IdentityTrainingSettings
    edit_settings: EditTrainingSettings
    clip: str | None
    identity_net: Any
    resolution: int | None
    max_images: int | None
    seed: int
    paired_targets: dict[str, str | Path]
    config: str | None
    allow_pickle: bool
    progress: LibraryProgress | None
    log: Callable[[str], None]
    side: int | None = None
    encoder: Any = None

    def prepare(
        self, todo: list[str], data, edit_data: dict, *, aligned: bool, output: Path, held_out: int, tune: bool
    ) -> dict[str, _FaceSet]:
        """Everything that can be wrong, before any training: data, model, CLIP, identity net, faces.
        ``held_out``: faces of ``data`` kept from training; ``tune``: the set :data:`_TUNE` is
        ``data``'s, the one that holds them."""
        names = [*todo, *([_TUNE] if tune else [])]
        for name in names:  # a missing or empty --data fails at once, before the model loads
            for item in _sources(edit_data.get(name, data)):
                _data_files(item)
        self.side = self.resolution or _model_side(self.model, config=self.config, allow_pickle=self.allow_pickle)
        self.clip = self.clip or _default_clip(self.model)
        if tune or any(name != IDENTITY for name in todo):
            _check_clip(self.clip)
        if todo:
            self.encoder = _identity_encoder(self.identity_net)
        return _face_sets(
            names,
            data,
            edit_data,
            aligned=aligned,
            resolution=self.side,
            max_images=self.max_images,
            output=output,
            progress=self.progress,
            held_out=held_out,
        )

    def train(self, name: str, face_set: _FaceSet, output: Path) -> dict:
        """One adapter trained, or continued from its trainer's last checkpoint; its summary for
        training.json."""
        trainer_progress = _trainer_progress(self.progress, name)
        common = dict(
            resume=True,
            identity=self.encoder,
            progress=trainer_progress,
            config=self.config,
            allow_pickle=self.allow_pickle,
        )
        own = dict(resolution=self.side, seed=self.seed, max_images=self.max_images if face_set.direct else None)
        if name == IDENTITY:
            self.log("ε1 (identity adapter)")
            settings = dataclasses.replace(self.identity_settings, **own)
            return _summary(train_identity(str(self.model), face_set.folder, output / name, settings, **common))
        edit = next(e for e in self.edits if e.name == name)
        self.log(f"ε2 for {name}: {self.source!r} -> {edit.target!r}")
        result = train_edit(
            str(self.model),
            self.source,
            edit.target,
            face_set.folder,
            self.clip,
            output / name,
            dataclasses.replace(self.edit_settings, **own),
            paired_targets=self.paired_targets.get(name),
            **common,
        )
        return {**_summary(result), "target": edit.target}


def _start_report(
    report: dict,
    output: Path,
    run: _LibraryRun,
    sets: dict[str, _FaceSet],
    *,
    recorded: dict,
    todo: list[str],
    report_extra: dict | None,
) -> None:
    """training.json as training starts, with the faces staged: a killed run resumes from it."""
    output.mkdir(parents=True, exist_ok=True)
    for name, extra in (report_extra or {}).items():
        if name == "steps":
            report.setdefault("steps", {}).update(extra)
        else:
            report.setdefault(name, extra)
    report.update(model=str(run.model), source=run.source, edits=recorded)
    if todo:
        report.update(resolution=run.side, seed=run.seed, identity_net=_describe(run.identity_net))
        if isinstance(run.identity_net, (str, Path)):  # identity guidance uses the net ε1 was trained against
            report["identity_net_copy"] = _copy_identity_net(Path(run.identity_net).expanduser(), output)
    report.setdefault("steps", {})
    report.setdefault("data", {})
    for face_set in {id(s): s for s in sets.values()}.values():
        _stage(face_set, output, run.log)
    for name, face_set in sets.items():
        if name != _TUNE:
            report["data"][name] = {"sources": list(face_set.sources), "faces": face_set.count}
        if face_set.held_out:
            report["held_out"] = {"sources": list(face_set.sources), "faces": face_set.held_out}
    write_json(output / REPORT_FILE, report)


def _complete_library(
    output: Path, report: dict, run: _LibraryRun, *, recorded: dict, started: float, keep_work: bool = False
) -> None:
    """The finished library: checkpoints and staged faces removed (``keep_work``: the staged faces
    kept, for tuning), training.json completed, and adapters.json written last, so that every
    file it names exists."""
    finished = finished_adapters(output)
    missing = [name for name in [IDENTITY, *(e.name for e in run.edits)] if name not in finished]
    if missing:  # cannot happen unless a file vanished under us
        raise UserError(
            f"{output}: the adapters {', '.join(missing)} are missing after training; run again with --resume"
        )
    for name in [IDENTITY, *recorded]:  # keep the adapters and their reports, not the checkpoints
        shutil.rmtree(output / name / "checkpoints", ignore_errors=True)
        shutil.rmtree(output / name / "cache", ignore_errors=True)
    if not keep_work:
        shutil.rmtree(output / WORK_DIR, ignore_errors=True)
    report["seconds"] = round(report.get("seconds", 0.0) + time.perf_counter() - started, 1)
    report["versions"] = library_versions()
    report["weights_bytes"] = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    write_json(output / REPORT_FILE, report)
    write_json(output / LIBRARY_FILE, _library(report, recorded, finished))


def _library(report: dict, recorded: dict, finished: set[str]) -> dict:
    """adapters.json: ε1 and every finished edit, in the order first asked for, and the identity net
    ε1 was trained against when it was not dlib's (identity guidance then uses it)."""
    edits = []
    for name, record in recorded.items():
        if name in finished:
            entry = AdapterEntry.from_record(record)
            edits.append(dataclasses.replace(entry, path=Path(name, ADAPTER_FILE)))
    copy = report.get("identity_net_copy")
    identity = Path(IDENTITY, ADAPTER_FILE) if IDENTITY in finished else None
    return AdapterLibrary(identity, tuple(edits), Path(copy) if copy else None).to_json()


def _held_out_count(output: Path, report: dict, grid: TuneGrid | None, tune_frames: int) -> int:
    """How many faces of ``data`` are kept from training: those of the run that started the
    library (kept whether or not this run tunes, so that a later ``--tune`` measures on faces no
    adapter saw), else ``tune_frames`` when tuning a library that starts now. Tuning a library
    whose adapters trained on every face is refused: it would measure on faces they know."""
    before = (report.get("held_out") or {}).get("faces")
    if before:
        if grid is not None and before != tune_frames:
            raise UserError(
                f"cannot tune {output} with --tune-frames {tune_frames}: its adapters were trained without "
                f"{before} faces kept for tuning; pass --tune-frames {before}"
            )
        return int(before)
    if grid is not None and report.get("steps"):
        raise UserError(
            f"cannot tune {output}: its adapters were trained on every face of --data, and tuning measures on "
            "faces they did not see; build the library with --tune from the start (another --output)"
        )
    return tune_frames if grid is not None else 0


def _tuned_already(report: dict, recorded: dict, edits: list[AdapterEntry], grid: TuneGrid, steps: int) -> bool:
    """Whether every edit of this run carries values chosen on this grid at these steps."""
    tuning = report.get("tuning") or {}
    if tuning.get("grid") != grid.to_json() or tuning.get("steps") != steps:
        return False
    chosen = tuning.get("edits", {})
    return all(
        "chosen" in chosen.get(e.name, {}) and recorded.get(e.name, {}).get("values_from") == VALUES_TUNED
        for e in edits
    )


def _tune_library(
    output: Path, report: dict, run: _LibraryRun, recorded: dict, face_set: _FaceSet, grid: TuneGrid, steps: int
) -> None:
    """Every edit's weight, guidance and blend threshold measured on the held-out faces with the
    library just written (:func:`~ipfacediff.adapters.tune.tune_edits`), each point's scores saved
    to training.json as measured, and the chosen values written into the edits' records."""
    from ipfacediff.adapters.tune import tune_edits
    from ipfacediff.diffusion import InversionCache
    from ipfacediff.editing.pipeline import IPFaceDiffPipeline
    from ipfacediff.evaluation import CropScorer
    from ipfacediff.models import load_model_set
    from ipfacediff.settings import ModelSpec

    faces = face_set.held_faces
    previous = report.get("tuning") or {}
    report["tuning"] = tuning = {
        "rule": RULE,
        "grid": grid.to_json(),
        "steps": steps,
        "seed": run.seed,
        "frames": len(faces),
        "scored_with": {"clip": str(run.clip), "identity_net": "dlib"},
        "edits": previous.get("edits", {}),
    }
    run.log(f"tuning {len(run.edits)} edit(s) on {len(faces)} held-out faces: {len(grid.points())} grid points each")
    spec = ModelSpec(model=str(run.model), adapters_dir=str(output), config=run.config, allow_pickle=run.allow_pickle)
    pipeline = IPFaceDiffPipeline.from_model_set(load_model_set(spec))
    tune_edits(
        pipeline,
        faces,
        run.edits,
        {e.name: output / e.name / ADAPTER_FILE for e in run.edits},
        tuning["edits"],
        grid=grid,
        scorer=CropScorer(str(run.clip)),
        source=run.source,
        steps=steps,
        seed=run.seed,
        clip=str(run.clip),
        cache=InversionCache(output / WORK_DIR / "inversion"),
        save=lambda: write_json(output / REPORT_FILE, report),
        progress=run.progress,
    )
    for edit in run.edits:
        chosen = tuning["edits"][edit.name]["chosen"]
        recorded[edit.name] = {
            **recorded[edit.name],
            **{name: chosen[name] for name in grid.to_json()},
            "values_from": VALUES_TUNED,
            "tuned_scores": {
                "clip_direction": chosen["clip_direction"],
                "id_sim": chosen["id_sim"],
                "frames": len(faces),
                "points": len(grid.points()),
            },
        }
    report["edits"] = recorded
    del pipeline
    gc.collect()


def _copy_identity_net(source: Path, output: Path) -> str:
    """The identity net copied into the library (a folder or one file), so the library carries it
    when it moves; its path relative to the library."""
    target = output / IDENTITY_NET_DIR / source.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    return target.relative_to(output).as_posix()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _nothing_to_resume(output: Path, log: Callable[[str], None]) -> None:
    """``--resume`` where no library was started: said, and refused where the folder holds files
    of something else (a run killed before its training.json has only the staged faces)."""
    foreign = (
        sorted(p.name for p in output.iterdir() if p.name not in (WORK_DIR, IDENTITY_NET_DIR))
        if output.is_dir()
        else []
    )
    if foreign:
        raise UserError(
            f"--resume: {output} holds no library to resume (no {REPORT_FILE}, but {foreign[0]}): "
            "choose the --output of the run to continue, or a new folder"
        )
    log(f"--resume: nothing to resume in {output} yet: training the library from the start")


def _check_resume(output: Path, report: dict, *, model: str, source: str, edits: list[AdapterEntry]) -> None:
    """A library continues only as it was started: same base model, source prompt, and targets."""
    if not report:
        return
    again = "use the same arguments, or choose another --output"
    if report.get("model") not in (None, str(model)) and _resolved(report["model"]) != _resolved(str(model)):
        raise UserError(
            f"cannot resume {output}: its adapters were trained for --model {report['model']}, now "
            f"{model}; LoRA adapters fit one base model: {again}"
        )
    if report.get("source") not in (None, source):
        raise UserError(
            f"cannot resume {output}: its edits start from --source {report['source']!r}, now {source!r}; {again}"
        )
    for edit in edits:
        before = report.get("edits", {}).get(edit.name)
        if before and before.get("target") != edit.target:
            raise UserError(
                f"cannot resume {output}: its {edit.name} adapter is trained towards "
                f"{before.get('target')!r}, now {edit.target!r}; give it another name, or remove "
                f"{output / edit.name}"
            )


def _resolved(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _trainer_settings(cls: type[S], options: dict | None, resolution: int | None, max_images: int | None) -> S:
    """A trainer's settings from a caller's options, checked before any face is looked for. A
    library keeps one checkpoint per adapter while it trains (unless told otherwise), and holds
    LoRA adapters only."""
    settings = cls(**{"keep_checkpoints": 1, **(options or {}), "resolution": resolution, "max_images": max_images})
    if settings.full:
        raise UserError("a library holds LoRA adapters: --full is not for `train library`")
    return settings


def _model_side(model: str, **loading) -> int:
    """The base model's image side (its faces are cropped at it); loading it checks it, too."""
    from ipfacediff.models import load_model_set, model_resolution

    models = load_model_set(str(model), adapters=False, **loading)
    side = model_resolution(models.vae, models.unet)
    del models
    gc.collect()
    return side


def _default_clip(model: str) -> str:
    folder = Path(model).expanduser() / "clip"
    return str(folder) if (folder / "config.json").is_file() else DEFAULT_CLIP


def _check_clip(clip: str) -> None:
    from ipfacediff.models import load_clip

    scorer = load_clip(clip)
    del scorer
    gc.collect()


def _identity_encoder(identity_net):
    import torch

    from ipfacediff.identity import IdentityEncoder

    if isinstance(identity_net, torch.nn.Module):
        return identity_net
    return IdentityEncoder.from_pretrained(identity_net)


def _describe(identity_net) -> str:
    import torch

    if identity_net is None:
        return "dlib"
    if isinstance(identity_net, torch.nn.Module):
        return type(identity_net).__name__
    return str(identity_net)


def _sources(data) -> tuple[str, ...]:
    items = [data] if isinstance(data, (str, Path)) else list(data or [])
    return tuple(str(Path(item).expanduser().resolve()) for item in items)


def _face_sets(
    todo: list[str],
    data,
    edit_data: dict,
    *,
    aligned: bool,
    resolution: int,
    max_images: int | None,
    output: Path,
    progress: LibraryProgress | None,
    held_out: int = 0,
) -> dict[str, _FaceSet]:
    """The training faces of every adapter to train: every source checked (all of them, the cheap
    checks first), the faces found, or staged faces of an earlier run reused. ``held_out``: faces
    of ``data``'s set kept from training (spread over it), for tuning to measure on."""
    by_sources: dict[tuple[str, ...], _FaceSet] = {}
    sets: dict[str, _FaceSet] = {}
    for name in todo:
        sources = _sources(edit_data[name]) if name in edit_data else _sources(data)
        if not sources:
            raise UserError("--data is needed: a video, a photo or a folder of them, with the face(s) to train on")
        sets[name] = by_sources.setdefault(sources, _FaceSet(sources))
    if held_out and _sources(data) in by_sources:
        by_sources[_sources(data)].held_out = held_out
    for face_set in by_sources.values():
        face_set.key = {
            "sources": list(face_set.sources),
            "resolution": resolution,
            "aligned": aligned,
            "max_images": max_images,
            **({"held_out": face_set.held_out} if face_set.held_out else {}),
        }
        single = Path(face_set.sources[0])
        if aligned and len(face_set.sources) == 1 and single.is_dir() and not face_set.held_out:
            # Aligned crops in one folder are the trainers' data as they are (before/after pairs keep their names).
            faces = _load_faces(single, resolution, aligned=True, max_images=max_images, progress=progress)
            face_set.folder, face_set.direct, face_set.count = single, True, len(faces)
            continue
        folder = output / WORK_DIR / f"faces-{_digest(face_set.key)}"
        held_folder = folder.with_name(f"held-out-{_digest(face_set.key)}")
        if _staged(folder, face_set.key) and (not face_set.held_out or _staged(held_folder, face_set.key)):
            face_set.folder, face_set.count = folder, _read_json(folder / "faces.json")["count"]
            if face_set.held_out:
                face_set.held_faces = np.stack(
                    [cv2.imread(str(p))[..., ::-1] for p in sorted(held_folder.glob("*.png"))]
                )
            continue
        faces = [
            _load_faces(Path(source), resolution, aligned=aligned, max_images=None, progress=progress)
            for source in face_set.sources
        ]
        stacked = np.concatenate(faces)
        if face_set.held_out:
            face_set.held_faces, stacked = _hold_out(stacked, face_set.held_out)
        if max_images is not None and len(stacked) > max_images:
            stacked = stacked[evenly_spaced(len(stacked), max_images)]
        face_set.faces, face_set.count = stacked, len(stacked)
    return sets


def _hold_out(faces: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` faces spread over ``faces`` (the middle of equal parts, so a clip's held-out
    frames are not its neighbours), and the others, in order."""
    if len(faces) <= count:
        raise UserError(
            f"--tune keeps {count} faces of --data from training to measure the edits on, and --data has "
            f"{len(faces)}: give more faces, or a smaller --tune-frames"
        )
    picked = np.unique(((np.arange(count) + 0.5) * len(faces) / count).astype(int))
    kept = np.setdiff1d(np.arange(len(faces)), picked)
    return faces[picked], faces[kept]


def _data_files(source: str) -> list[Path]:
    try:
        return training_files(source)
    except UserError as error:
        raise UserError(f"--data: {error}") from None


def _load_faces(
    source: Path, resolution: int, *, aligned: bool, max_images: int | None, progress: LibraryProgress | None
) -> np.ndarray:
    stage = f"faces {source.name}"
    report = (lambda _stage, done, total, _loss=None: progress(stage, done, total)) if progress else None
    try:
        return load_training_faces(
            source, resolution, max_images=max_images, detect_images=not aligned, strict=True, progress=report
        )
    except UserError as error:
        raise UserError(f"--data: {error}") from None


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _staged(folder: Path, key: dict) -> bool:
    index = _read_json(folder / "faces.json")
    return (
        isinstance(index, dict)
        and index.get("key") == key
        and len(list(folder.glob("*.png"))) == index.get("count", -1)
    )


def _stage(face_set: _FaceSet, output: Path, log: Callable[[str], None]) -> None:
    """Write extracted faces as lossless PNGs (the trainers read them back bit for bit, so a
    resumed run sees the same faces), through a temporary folder renamed into place."""
    if face_set.faces is None:
        return
    folder = output / WORK_DIR / f"faces-{_digest(face_set.key)}"
    if face_set.held_out:
        _write_faces(folder.with_name(f"held-out-{_digest(face_set.key)}"), face_set.held_faces, face_set.key)
    _write_faces(folder, face_set.faces, face_set.key)
    log(f"{len(face_set.faces)} aligned faces from {', '.join(Path(s).name for s in face_set.sources)}")
    face_set.folder, face_set.faces = folder, None


def _write_faces(folder: Path, faces: np.ndarray, key: dict) -> None:
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for index, face in enumerate(faces):
        if not cv2.imwrite(str(temporary / f"{index:05d}.png"), np.ascontiguousarray(face[..., ::-1])):
            raise UserError(f"cannot write the training faces to {temporary}: is the disk full?")
    write_json(temporary / "faces.json", {"key": key, "count": len(faces)})
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)


def _trainer_progress(progress: LibraryProgress | None, name: str):
    if progress is None:
        return None
    return lambda stage, done, total, loss=None: progress(f"{name} {stage}", done, total)


def _summary(result) -> dict:
    return {
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "faces": result.faces,
        "validation_before": result.validation_before,
        "validation_after": result.validation_after,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "resumed_from": result.resumed_from,
    }
