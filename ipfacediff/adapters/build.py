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

An edit is a built-in name (:data:`~ipfacediff.adapters.edits.BUILTIN_EDITS`: a target prompt, the prompt words that ask for
it and FaceWorld's tuned guidance / blend threshold / weight as starting values, marked
``"defaults_from": "faceworld tuning"`` in adapters.json) or ``NAME="target prompt"``, whose words
come from its name and prompt (:func:`~ipfacediff.adapters.words.derive_words`).
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
    FACEWORLD_DEFAULTS,
    IDENTITY,
    IDENTITY_NET_DIR,
    SOURCE_PROMPT,
    WORK_DIR,
    parse_edits,
)
from ipfacediff.adapters.record import ADAPTER_LIBRARY, AdapterEntry, AdapterLibrary
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


@dataclass
class _FaceSet:
    """The training faces of some adapters: a folder the trainers read, checked or extracted."""

    sources: tuple[str, ...]
    folder: Path | None = None  # the trainers' data; set when staged (or for a ready folder of crops)
    faces: np.ndarray | None = None  # extracted, waiting to be staged
    direct: bool = False  # a folder of aligned crops used as it is (the trainers apply max_images)
    count: int = 0  # faces in it
    key: dict = field(default_factory=dict)


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
    defaults_from: str | None = FACEWORLD_DEFAULTS,
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
    ``output`` is an error. ``defaults_from``: the mark of the built-in edits' tuned values in
    adapters.json (None: tuned on this model). ``report_extra``: keys the report starts with.
    ``config`` / ``allow_pickle``: how ``model`` loads, as :func:`~ipfacediff.models.load_model_set`'s.

    Everything that can be wrong with the arguments (the model, the data, the CLIP model, the
    identity net, the edits) is one UserError line before any training starts. ``adapters.json``
    is written last, so a killed run never leaves one that names missing files.
    """
    started = time.perf_counter()
    log = log or (lambda _message: None)
    edits = _edit_entries(edits, source)
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
    recorded = _recorded_edits(report, edits)
    finished = finished_adapters(output)
    todo = [name for name in [IDENTITY, *(e.name for e in edits)] if name not in finished]
    library_file = output / LIBRARY_FILE
    if (
        not todo
        and library_file.is_file()
        and _library(report, recorded, finished, defaults_from) == _read_json(library_file)
    ):
        log(f"{library_file}: every adapter is trained already")
        return report

    check_writable_folder(output, what="--output")  # not a PermissionError after the faces are found
    sets = run.prepare(todo, data, edit_data or {}, aligned=aligned, output=output) if todo else {}
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
    _complete_library(output, report, run, recorded=recorded, defaults_from=defaults_from, started=started)
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
        recorded[edit.name] = edit.to_record()
    return recorded


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

    def prepare(self, todo: list[str], data, edit_data: dict, *, aligned: bool, output: Path) -> dict[str, _FaceSet]:
        """Everything that can be wrong, before any training: data, model, CLIP, identity net, faces."""
        for name in todo:  # a missing or empty --data fails at once, before the model loads
            for item in _sources(edit_data.get(name, data)):
                _data_files(item)
        self.side = self.resolution or _model_side(self.model, config=self.config, allow_pickle=self.allow_pickle)
        self.clip = self.clip or _default_clip(self.model)
        if any(name != IDENTITY for name in todo):
            _check_clip(self.clip)
        self.encoder = _identity_encoder(self.identity_net)
        return _face_sets(
            todo,
            data,
            edit_data,
            aligned=aligned,
            resolution=self.side,
            max_images=self.max_images,
            output=output,
            progress=self.progress,
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
        report["data"][name] = {"sources": list(face_set.sources), "faces": face_set.count}
    write_json(output / REPORT_FILE, report)


def _complete_library(
    output: Path, report: dict, run: _LibraryRun, *, recorded: dict, defaults_from: str | None, started: float
) -> None:
    """The finished library: checkpoints and staged faces removed, training.json completed, and
    adapters.json written last, so that every file it names exists."""
    finished = finished_adapters(output)
    missing = [name for name in [IDENTITY, *(e.name for e in run.edits)] if name not in finished]
    if missing:  # cannot happen unless a file vanished under us
        raise UserError(
            f"{output}: the adapters {', '.join(missing)} are missing after training; run again with --resume"
        )
    for name in [IDENTITY, *recorded]:  # keep the adapters and their reports, not the checkpoints
        shutil.rmtree(output / name / "checkpoints", ignore_errors=True)
        shutil.rmtree(output / name / "cache", ignore_errors=True)
    shutil.rmtree(output / WORK_DIR, ignore_errors=True)
    report["seconds"] = round(report.get("seconds", 0.0) + time.perf_counter() - started, 1)
    report["versions"] = library_versions()
    report["weights_bytes"] = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    write_json(output / REPORT_FILE, report)
    write_json(output / LIBRARY_FILE, _library(report, recorded, finished, defaults_from))


def _library(report: dict, recorded: dict, finished: set[str], defaults_from: str | None) -> dict:
    """adapters.json: ε1 and every finished edit, in the order first asked for, and the identity net
    ε1 was trained against when it was not dlib's (identity guidance then uses it)."""
    edits = []
    for name, record in recorded.items():
        if name in finished:
            entry = AdapterEntry.from_record(record)
            mark = defaults_from if entry.has_tuned_values() else None
            edits.append(dataclasses.replace(entry, path=Path(name, ADAPTER_FILE), defaults_from=mark))
    copy = report.get("identity_net_copy")
    identity = Path(IDENTITY, ADAPTER_FILE) if IDENTITY in finished else None
    return AdapterLibrary(identity, tuple(edits), Path(copy) if copy else None).to_json()


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
) -> dict[str, _FaceSet]:
    """The training faces of every adapter to train: every source checked (all of them, the cheap
    checks first), the faces found, or staged faces of an earlier run reused."""
    by_sources: dict[tuple[str, ...], _FaceSet] = {}
    sets: dict[str, _FaceSet] = {}
    for name in todo:
        sources = _sources(edit_data[name]) if name in edit_data else _sources(data)
        if not sources:
            raise UserError("--data is needed: a video, a photo or a folder of them, with the face(s) to train on")
        sets[name] = by_sources.setdefault(sources, _FaceSet(sources))
    for face_set in by_sources.values():
        face_set.key = {
            "sources": list(face_set.sources),
            "resolution": resolution,
            "aligned": aligned,
            "max_images": max_images,
        }
        single = Path(face_set.sources[0])
        if aligned and len(face_set.sources) == 1 and single.is_dir():
            # Aligned crops in one folder are the trainers' data as they are (before/after pairs keep their names).
            faces = _load_faces(single, resolution, aligned=True, max_images=max_images, progress=progress)
            face_set.folder, face_set.direct, face_set.count = single, True, len(faces)
            continue
        folder = output / WORK_DIR / f"faces-{_digest(face_set.key)}"
        if _staged(folder, face_set.key):
            face_set.folder, face_set.count = folder, _read_json(folder / "faces.json")["count"]
            continue
        faces = [
            _load_faces(Path(source), resolution, aligned=aligned, max_images=None, progress=progress)
            for source in face_set.sources
        ]
        stacked = np.concatenate(faces)
        if max_images is not None and len(stacked) > max_images:
            stacked = stacked[evenly_spaced(len(stacked), max_images)]
        face_set.faces, face_set.count = stacked, len(stacked)
    return sets


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
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for index, face in enumerate(face_set.faces):
        if not cv2.imwrite(str(temporary / f"{index:05d}.png"), np.ascontiguousarray(face[..., ::-1])):
            raise UserError(f"cannot write the training faces to {temporary}: is the disk full?")
    write_json(temporary / "faces.json", {"key": face_set.key, "count": len(face_set.faces)})
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    log(f"{len(face_set.faces)} aligned faces from {', '.join(Path(s).name for s in face_set.sources)}")
    face_set.folder, face_set.faces = folder, None


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
