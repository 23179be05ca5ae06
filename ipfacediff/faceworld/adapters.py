"""Train the FaceWorld model set's ε1 and ε2 adapters and write its adapter library.

IP-FaceDiff fine-tunes two copies of the base model once: ε1 with an identity loss, ε2 once per
attribute with a directional CLIP loss. This runs the project's own trainers
(:func:`ipfacediff.training.train_identity`, :func:`ipfacediff.training.train_edit`) on FaceWorld
renders of *training* identities, and writes ``MODEL/adapters/`` so that the normal loader uses
them without flags (:class:`ipfacediff.models.AdapterLibrary`)::

    ipfacediff faceworld adapters MODEL [--preset smoke|cpu|gpu] [--identity-net DIR] [--resume]
    (the same as python -m ipfacediff.faceworld.adapters ...)

1. identity net: the trainers' identity loss needs an ArcFace stand-in. It is *not* the identity
   net the benchmark scores with (``MODEL/oracles/identity``): unless ``--identity-net`` is given,
   a second one is trained here (:func:`ipfacediff.faceworld.oracles.train_oracles`, seed + 1), so
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

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2

from ipfacediff.errors import UserError
from ipfacediff.faceworld.attributes import EDITS, Attributes, caption
from ipfacediff.faceworld.scene import dataset_item
from ipfacediff.files import write_json
from ipfacediff.models import ADAPTER_LIBRARY, library_versions
from ipfacediff.training import ADAPTER_FILE, train_edit, train_identity

# Words of a prompt that ask for each edit (see AdapterLibrary.pick).
EDIT_WORDS = {
    "eyeglasses": ["eyeglasses", "glasses", "spectacles"],
    "blonde_hair": ["blonde", "blond"],
    "beard": ["beard", "bearded"],
    "smile": ["smile", "smiling", "smiles", "smiley"],
}
HAIR_EDITS = ("blonde_hair",)
# Local-blend thresholds tuned per edit on held-out people the quality report does not use
# (benchmarks/faceworld_quality.py --offset 20): a smile reshapes the mouth and needs more room
# than where the prompt changes ε2's prediction most (success 0.81 → 0.94 on 16 people at 0.3,
# tuned on the previous, CPU-trained model set). Blonde hair on the GPU-trained set, 16 tuning
# people: 0.5 / 0.55 / 0.6 gave success 0.94 / 0.88 / 0.88, identity 0.588 / 0.618 / 0.635, warp
# error 1.87 / 1.76 / 1.74: a tighter region keeps more of the face and flickers less. Beard, same
# people, region filtered over time: 0.5 / 0.6 / 0.7 gave success 0.69 / 0.69 / 0.62, identity
# 0.681 / 0.690 / 0.728, warp error 1.389 / 1.377 / 1.357, but on the report's people 0.6 lost
# three beards of 17 (success 0.85 → 0.70), so beard stays at the default 0.5.
BLEND_THRESHOLDS = {"smile": 0.3, "blonde_hair": 0.6}
# Adapter weights tuned the same way (16 tuning people, the GPU-trained model set): the base model,
# taught eyeglasses by FaceWorld's captions, draws them on 11 of 16 at identity 0.795; the
# eyeglasses adapter at full weight draws them on all 16 but, pushed along CLIP's direction, darkens
# the lenses and ages the face (0.667); at 0.5 / 0.3 all 16 at 0.737 / 0.764.
ADAPTER_WEIGHTS = {"eyeglasses": 0.3}
# Classifier-free guidance tuned the same way (16 tuning people, all four edits, region filtered;
# success / identity at 7.5 / 5 / 3): eyeglasses 1.00 / 0.773, 1.00 / 0.788, 0.56 / 0.823; smile
# 1.00 / 0.846, 1.00 / 0.864, 0.94 / 0.876; blonde hair 0.81 / 0.649, 0.62 / 0.706; beard 0.69 /
# 0.681, 0.50 / 0.722. Eyeglasses and smile show on every face with less push than the edit
# command's default, and less push leaves more of the face; the other two need the default.
ADAPTER_GUIDANCES = {"eyeglasses": 5.0, "smile": 5.0}
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
    "smoke": Preset(identity_faces=8, identity_steps=2, identity_batch=2, edit_faces=4, edit_steps=2, edit_batch=2,
                    inversion_steps=4, generation_steps=2, oracles_preset="smoke"),
    # About 40 minutes on two CPU cores (plus ~13 for the trainers' identity net).
    "cpu": Preset(identity_faces=512, identity_steps=600, identity_batch=16, edit_faces=192, edit_steps=240,
                  edit_batch=4),
    "gpu": Preset(identity_faces=2048, identity_steps=2000, identity_batch=64, edit_faces=512, edit_steps=600,
                  edit_batch=16, generation_steps=6, inversion_steps=40, oracles_preset="gpu"),
}  # fmt: skip


# ε2's L1 weight with --paired (to the true edit, where unpaired it is train_edit's 0.1 to the
# input face): tried at 1.0 on the 16 tuning people, level with the unpaired adapters (README).
PAIRED_LAMBDA_L1 = 1.0


def edit_target(edit: str) -> str:
    """The caption an edit adapter is trained towards: "a face with eyeglasses", "a smiling face"."""
    return caption(EDITS[edit].apply(Attributes()))


def write_faces(folder: Path, count: int, seed: int, *, without: str | None = None,
                edited: Path | None = None) -> Path:
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


def train_adapters(model: str | Path, *, preset: str = "cpu", identity_net: str | Path | None = None,
                   edits: list[str] | None = None, seed: int = 0, resume: bool = False, paired: bool = False,
                   log=print) -> dict:
    """Train ε1 and the edit adapters for ``model`` (a FaceWorld model folder) into
    ``model/adapters``; returns the report written to ``adapters/training.json``.

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
    work = root / "train_data"  # renders and the trainers' identity net; removed at the end
    started = time.perf_counter()
    report_path = root / "training.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {
        "preset": preset, "settings": asdict(chosen), "seed": seed, "steps": {}, "paired": paired}
    if report.get("paired", False) != paired:
        raise UserError(f"cannot resume {root}: its edit adapters were trained {'with' if not paired else 'without'} "
                        "--paired; resume it the same way, or remove it")

    def done(name: str) -> bool:
        return name in report["steps"] and (root / name / ADAPTER_FILE).is_file()

    if all(done(name) for name in ["identity", *edits]) and (model / ADAPTER_LIBRARY).is_file():
        return report
    if identity_net is None:
        identity_net = work / "identity_net" / "identity"
        if not (identity_net / "config.json").is_file():
            from ipfacediff.faceworld.oracles import train_oracles

            log(f"identity net for the trainers: oracles preset {chosen.oracles_preset}, seed {seed + 1}")
            tick = time.perf_counter()
            made = train_oracles(identity_net.parent, preset=chosen.oracles_preset, seed=seed + 1, progress=log)
            report["steps"]["identity_net"] = {
                "seconds": round(time.perf_counter() - tick, 1), "seed": seed + 1,
                "held_out_verification_accuracy": made["identity"]["held_out"]["verification_accuracy"]}
            write_json(report_path, report)
    from ipfacediff.identity import IdentityEncoder

    encoder = IdentityEncoder.from_pretrained(identity_net)

    if not done("identity"):
        log("ε1 (identity adapter)")
        data = write_faces(work / "faces" / "identity", chosen.identity_faces, seed)
        result = train_identity(str(model), data, root / "identity", max_steps=chosen.identity_steps,
                                batch_size=chosen.identity_batch, learning_rate=chosen.lr, rank=chosen.rank,
                                lambda_id=chosen.lambda_id, checkpoint_every=100, keep_checkpoints=1,
                                resume=resume, seed=seed, identity=encoder)
        report["steps"]["identity"] = _summary(result)
        write_json(report_path, report)
    for edit in edits:
        if done(edit):
            continue
        log(f"ε2 for {edit}: {SOURCE!r} -> {edit_target(edit)!r}")
        truth = work / "faces" / f"{edit}_edited" if paired else None
        data = write_faces(work / "faces" / edit, chosen.edit_faces, seed + 7, without=edit, edited=truth)
        result = train_edit(str(model), SOURCE, edit_target(edit), data, str(model / "clip"), root / edit,
                            max_steps=chosen.edit_steps, batch_size=chosen.edit_batch, learning_rate=chosen.lr,
                            rank=chosen.rank, lambda_id=chosen.lambda_id, paired_targets=truth, t0=chosen.t0,
                            **({"lambda_l1": PAIRED_LAMBDA_L1} if paired else {}),
                            inversion_steps=chosen.inversion_steps, generation_steps=chosen.generation_steps,
                            checkpoint_every=50, keep_checkpoints=1, resume=resume, seed=seed, identity=encoder)
        report["steps"][edit] = _summary(result)
        write_json(report_path, report)

    for name in ["identity", *edits]:  # keep the adapters and their reports, not the checkpoints
        shutil.rmtree(root / name / "checkpoints", ignore_errors=True)
        shutil.rmtree(root / name / "cache", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    for report_file in root.glob("*/training.json"):  # the trainers' reports: paths relative to MODEL
        text = report_file.read_text()
        for prefix in {str(model.resolve()), str(model)}:
            text = text.replace(json.dumps(prefix)[1:-1], "MODEL")
        report_file.write_text(text)
    library = {
        "identity": f"identity/{ADAPTER_FILE}",
        "edits": {e: {"path": f"{e}/{ADAPTER_FILE}", "words": EDIT_WORDS[e], "target": edit_target(e),
                      "hair": e in HAIR_EDITS}
                  | ({"blend_threshold": BLEND_THRESHOLDS[e]} if e in BLEND_THRESHOLDS else {})
                  | ({"weight": ADAPTER_WEIGHTS[e]} if e in ADAPTER_WEIGHTS else {})
                  | ({"guidance": ADAPTER_GUIDANCES[e]} if e in ADAPTER_GUIDANCES else {})
                  for e in edits},
    }
    report["seconds"] = round(report.get("seconds", 0.0) + time.perf_counter() - started, 1)
    report["versions"] = library_versions()
    report["weights_bytes"] = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    write_json(report_path, report)
    write_json(model / ADAPTER_LIBRARY, library)
    return report


def _summary(result) -> dict:
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "faces": result.faces,
            "validation_before": result.validation_before, "validation_after": result.validation_after,
            "loss_first": result.losses[0] if result.losses else None,
            "loss_last": result.losses[-1] if result.losses else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ipfacediff.faceworld.adapters",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="FaceWorld model folder (from ipfacediff.faceworld.train)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--identity-net", type=Path, default=None,
                        help="identity net for the trainers' identity loss (default: train one, seed + 1)")
    parser.add_argument("--edits", default=",".join(EDITS), help="comma-separated subset of " + ", ".join(EDITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue or complete MODEL/adapters")
    parser.add_argument("--paired", action="store_true",
                        help="train each ε2 on before/after renders as well (not the shipped adapters' way)")
    args = parser.parse_args(argv)
    try:
        edits = [e.strip() for e in args.edits.split(",") if e.strip()]
        unknown = [e for e in edits if e not in EDITS]
        if unknown:
            raise UserError(f"unknown edit(s) {', '.join(unknown)}: choose from {', '.join(EDITS)}")
        report = train_adapters(args.model, preset=args.preset, identity_net=args.identity_net, edits=edits,
                                seed=args.seed, resume=args.resume, paired=args.paired)
    except UserError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"{args.model / ADAPTER_LIBRARY}: {report['seconds']:.0f} s, {report['weights_bytes'] / 1e6:.2f} MB of adapters")


if __name__ == "__main__":
    main()
