"""Train the FaceWorld model set's ε1 and ε2 adapters and write its adapter library.

IP-FaceDiff fine-tunes two copies of the base model once: ε1 with an identity loss, ε2 once per
attribute with a directional CLIP loss. This runs the project's own trainers
(:func:`ipfacediff.training.train_identity`, :func:`ipfacediff.training.train_edit`) on FaceWorld
renders of *training* identities, and writes ``MODEL/adapters/`` so that the normal loader uses
them without flags (:class:`ipfacediff.models.AdapterLibrary`)::

    ipfacediff faceworld adapters MODEL [--preset smoke|cpu|gpu] [--identity-net DIR] [--resume]
    (the same as python -m faceworld adapters ...)

1. identity net: the trainers' identity loss needs an ArcFace stand-in. It is *not* the identity
   net the benchmark scores with (``MODEL/oracles/identity``): unless ``--identity-net`` is given,
   a second one is trained here (:func:`faceworld.oracles.train_oracles`, seed + 1), so
   the adapters are not fitted to their judge;
2. ε1 (``adapters/identity``): the denoising loss on FaceWorld faces with the empty prompt plus the
   identity term on one-step estimates;
3. ε2 per edit (``adapters/<edit>``): faces without the attribute, DDIM-inverted to t0 with the
   base model, regenerated with the adapter under "a face with eyeglasses" (etc.); the loss is
   CLIP's direction from "a face" to that caption (``MODEL/clip``), plus identity and L1 terms.

Each step's output folder holds the trainer's checkpoints, so ``--resume`` continues a killed run;
finished steps are skipped. ``MODEL/adapters/training.json`` records settings, seconds and the
validation losses; ``MODEL/adapters/adapters.json`` is written last.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2

from ipfacediff.errors import UserError
from faceworld.attributes import EDITS, Attributes, caption
from faceworld.scene import dataset_item
from ipfacediff.adapters.build import build_library, finished_adapters
from ipfacediff.adapters.edits import (  # noqa: F401 - EDIT_WORDS and the tuned values are FaceWorld's, kept importable here
    ADAPTER_GUIDANCES,
    ADAPTER_WEIGHTS,
    BLEND_THRESHOLDS,
    EDIT_WORDS,
    HAIR_EDITS,
    WORK_DIR,
    builtin_edit,
)
from ipfacediff.adapters.record import VALUES_FACEWORLD
from ipfacediff.models import ADAPTER_LIBRARY

# The four edits' prompt words, hair flag and tuned values (guidance, blend threshold, weight) live
# with the generic library builder; the tuned values are FaceWorld's only, passed in below.
SOURCE = caption(Attributes())  # "a face"


@dataclass(frozen=True)
class Preset:
    identity_faces: int
    identity_steps: int
    identity_batch: int
    edit_faces: int
    edit_steps: int
    edit_batch: int
    lr: float = 5e-4
    rank: int = 8
    lambda_id: float = 0.1  # both trainers' identity weight
    t0: int = 500
    inversion_steps: int = 20
    generation_steps: int = 4
    oracles_preset: str = "cpu"  # the trainers' own identity net (when --identity-net is not given)


PRESETS = {
    "smoke": Preset(
        identity_faces=8,
        identity_steps=2,
        identity_batch=2,
        edit_faces=4,
        edit_steps=2,
        edit_batch=2,
        inversion_steps=4,
        generation_steps=2,
        oracles_preset="smoke",
    ),
    # About 40 minutes on two CPU cores (plus ~13 for the trainers' identity net).
    "cpu": Preset(
        identity_faces=512, identity_steps=600, identity_batch=16, edit_faces=192, edit_steps=240, edit_batch=4
    ),
    "gpu": Preset(
        identity_faces=2048,
        identity_steps=2000,
        identity_batch=64,
        edit_faces=512,
        edit_steps=600,
        edit_batch=16,
        generation_steps=6,
        inversion_steps=40,
        oracles_preset="gpu",
    ),
}


# ε2's L1 weight with --paired (to the true edit, where unpaired it is train_edit's 0.1 to the
# input face): tried at 1.0 on the 16 tuning people, level with the unpaired adapters (README).
PAIRED_LAMBDA_L1 = 1.0


def edit_target(edit: str) -> str:
    """The caption an edit adapter is trained towards: "a face with eyeglasses", "a smiling face"."""
    return caption(EDITS[edit].apply(Attributes()))


def write_faces(folder: Path, count: int, seed: int, *, without: str | None = None, edited: Path | None = None) -> Path:
    """``count`` aligned 64x64 training-identity renders as PNGs (random attributes; with
    ``without``, that edit undone on each, so every face can receive it; with ``edited`` too,
    the same faces with the edit made, under the same names in that folder: the edit's truth)."""
    if edited is not None and without is None:
        raise ValueError("edited renders need the edit: pass without= as well")
    folder.mkdir(parents=True, exist_ok=True)
    if edited is not None:
        edited.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        item = dataset_item("train", index, seed)
        attributes = item.attributes
        if without is not None:
            undone = {name: getattr(Attributes(), name) for name, _ in EDITS[without].changes}
            attributes = attributes.replace(**undone)
        cv2.imwrite(str(folder / f"{index:05d}.png"), item.render(64, attributes)[..., ::-1])
        if edited is not None:
            truth = item.render(64, EDITS[without].apply(attributes))
            cv2.imwrite(str(edited / f"{index:05d}.png"), truth[..., ::-1])
    return folder


def train_adapters(
    model: str | Path,
    *,
    preset: str = "cpu",
    identity_net: str | Path | None = None,
    edits: list[str] | None = None,
    seed: int = 0,
    resume: bool = False,
    paired: bool = False,
    log=print,
) -> dict:
    """Train ε1 and the edit adapters for ``model`` (a FaceWorld model folder) into
    ``model/adapters``; returns the report written to ``adapters/training.json``.

    The training is :func:`ipfacediff.adapters.build.build_library`'s, with FaceWorld's data (renders of
    training identities, each edit's faces without its attribute), its own identity net and the
    preset's settings; the library's tuned values are FaceWorld's own (``"values_from": "faceworld"``).

    ``paired``: ε2 also sees each training face with its edit rendered (the world's truth for
    training identities) and learns from the pairs (train_edit's ``paired_targets``) instead of
    CLIP's text direction alone."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    model = Path(model)
    if not (model / "model_index.json").is_file() or not (model / "clip").is_dir():
        raise UserError(f"{model} is not a FaceWorld model folder (model_index.json and clip/ are needed)")
    root = model / "adapters"
    if root.exists() and not resume:
        raise UserError(f"{root} exists: pass --resume to continue or complete it, or remove it")
    edits = edits or list(EDITS)
    work = root / WORK_DIR  # renders and the trainers' identity net; the builder removes it at the end
    report_path = root / "training.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if report and report.get("paired", False) != paired:
        raise UserError(
            f"cannot resume {root}: its edit adapters were trained {'with' if not paired else 'without'} "
            "--paired; resume it the same way, or remove it"
        )
    finished = finished_adapters(root)
    if {"identity", *edits} <= finished and (model / ADAPTER_LIBRARY).is_file():
        return report
    extra = {"preset": preset, "settings": asdict(chosen), "seed": seed, "paired": paired, "steps": {}}
    if identity_net is None:
        identity_net = work / "identity_net" / "identity"
        if not (identity_net / "config.json").is_file():
            from faceworld.oracles import train_oracles

            log(f"identity net for the trainers: oracles preset {chosen.oracles_preset}, seed {seed + 1}")
            tick = time.perf_counter()
            made = train_oracles(identity_net.parent, preset=chosen.oracles_preset, seed=seed + 1, progress=log)
            extra["steps"]["identity_net"] = {
                "seconds": round(time.perf_counter() - tick, 1),
                "seed": seed + 1,
                "held_out_verification_accuracy": made["identity"]["held_out"]["verification_accuracy"],
            }
    from ipfacediff.identity import IdentityEncoder

    encoder = IdentityEncoder.from_pretrained(identity_net)

    # Only what is still to train is rendered: the identity faces, and each edit's faces without it.
    identity_faces = (
        None if "identity" in finished else write_faces(work / "faces" / "identity", chosen.identity_faces, seed)
    )
    edit_data, truths = {}, {}
    for edit in edits:
        if edit in finished:
            continue
        truths[edit] = work / "faces" / f"{edit}_edited" if paired else None
        edit_data[edit] = write_faces(
            work / "faces" / edit, chosen.edit_faces, seed + 7, without=edit, edited=truths[edit]
        )
    identity_options = dict(
        max_steps=chosen.identity_steps,
        batch_size=chosen.identity_batch,
        learning_rate=chosen.lr,
        rank=chosen.rank,
        lambda_id=chosen.lambda_id,
        checkpoint_every=100,
        keep_checkpoints=1,
    )
    edit_options = dict(
        max_steps=chosen.edit_steps,
        batch_size=chosen.edit_batch,
        learning_rate=chosen.lr,
        rank=chosen.rank,
        lambda_id=chosen.lambda_id,
        t0=chosen.t0,
        inversion_steps=chosen.inversion_steps,
        generation_steps=chosen.generation_steps,
        checkpoint_every=50,
        keep_checkpoints=1,
        **({"lambda_l1": PAIRED_LAMBDA_L1} if paired else {}),
    )
    report = build_library(
        str(model),
        [identity_faces] if identity_faces else None,
        [builtin_edit(edit) for edit in edits],
        root,
        clip=str(model / "clip"),
        identity_net=encoder,
        source=SOURCE,
        aligned=True,
        identity_options=identity_options,
        edit_options=edit_options,
        edit_data=edit_data,
        paired_targets={e: t for e, t in truths.items() if t is not None},
        seed=seed,
        resume=True,
        values=VALUES_FACEWORLD,  # the table's values were tuned on FaceWorld's models: they are its own
        report_extra=extra,
        log=log,
    )
    for report_file in root.glob("*/training.json"):  # the trainers' reports: paths relative to MODEL
        text = report_file.read_text()
        for prefix in {str(model.resolve()), str(model)}:
            text = text.replace(json.dumps(prefix)[1:-1], "MODEL")
        report_file.write_text(text)
    return report
