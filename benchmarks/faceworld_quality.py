"""Oracle scoring on FaceWorld: held-out people × the four edits, for the full method and its ablations.

    python benchmarks/faceworld_quality.py --json OUT.json [--identities 20] [--offset 0] [--frames 12] [--steps 20]
        [--model DIR] [--oracles DIR] [--methods full,no_identity_guidance,no_identity_gradient,every_frame,no_adapters ('': the reference rows only)]
        [--guidance G] [--strength S] [--adapter-weight W] [--hair auto|on|off] [--source-prompt caption|empty]
        [--no-detail-transfer] [--no-local-blend] [--blend-threshold T] [--propagation-temperature T]
        [--temporal-smoothing W] [--keyframes K] [--all-keyframes-below T] [--inject-feature-until T]
        [--inject-attention-until T] [--identity-gradient S] [--identity-gradient-from T]

Every edit has a ground truth: FaceWorld re-renders the same clip with only the attribute changed.
The prompt is the caption of the edited attributes ("a smiling face with brown hair and eyeglasses"),
the source prompt by default the input's caption, and the edit runs with that edit's ε2 adapter of
the model's library (when it has one). Per method (full, --no-identity-guidance, --identity-gradient 0,
--every-frame, and no_adapters: the full method with the library's adapters off, ε1 = ε2 = base) it reports
- attribute_success: share of (person, edit) whose edited face crops the attribute oracle calls
  positive for the target attribute (mean probability > 0.5) with every other attribute's call
  unchanged from the input;
- id_sim_to_truth: cosine of the FaceWorld identity net between edited and ground-truth crops;
- id_sim_to_input: the same between edited and input crops (the paper's ID-sim). It rewards an
  edit that changes little: the unedited input scores 1 on it, and an attribute the identity net
  is not blind to (a beard, new hair) costs a true edit some of it;
- guide_sim_to_input: the same with the net identity guidance optimises (the model card's, the
  trainers' own): where it is high and the oracle's is not, guidance has done what its net can see;
- psnr_outside_edit: PSNR (dB) to the ground truth outside the edit's region (dilated 3 px);
- warp_error: mean |Δ_t edited − Δ_t truth|, Δ_t the change from frame t to t+1 (0–255): the
  flicker the edit adds that the true edit does not have (the renderer knows the motion exactly);
- seconds: mean time of one edit (inversion shared through the cache, as in real use).

The JSON also holds every method's scores per edit (``by_edit``), paired comparisons of the full
method with each other method (``comparisons``: the mean per-(person, edit) difference in identity
similarity and warp error, full minus the other, with a 95 % interval from the spread of those
differences: the same people and edits, so their own variation cancels; and the identity difference
on the items both methods edited successfully, ``id_sim_to_truth_both_edited``), and two reference rows:
- ``unedited``: the input itself scored the same way, the reference a method must move away from
  (attribute success 0 by construction) while keeping its identity similarity and PSNR;
- ``truth_through_vae``: the ground truth as this model set can deliver it at best — each true
  edited crop encoded and decoded by the model's VAE, the VAE's loss put back by detail transfer
  where the truth differs little from the input (as the pipeline does), scored on the crops
  (attribute success and identity only; paste-back is not applied, so a real edit pays that
  resampling on top). What a method's id_sim can be expected to reach through this VAE.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfacediff.diffusion import InversionCache, decode_latents, encode_frames  # noqa: E402
from ipfacediff.editing import transfer_detail  # noqa: E402
from faceworld import EDITS, HELD_OUT_IDS, caption, render_clip  # noqa: E402
from faceworld.oracles import ATTRIBUTE_NAMES, AttributeOracle, FaceWorldIdentity  # noqa: E402
from ipfacediff.face import alignment_transforms, crop_face  # noqa: E402
from ipfacediff.job import SHIPPED_MODELS, edit_video, load_pipeline  # noqa: E402
from ipfacediff.settings import EditSettings  # noqa: E402
from ipfacediff.video import read_frames, write_video  # noqa: E402

METHODS = {
    "full": {},
    "no_identity_guidance": {"feature_injection": False},
    "no_identity_gradient": {"identity_gradient": 0.0},
    "every_frame": {"every_frame": True},
    "no_adapters": {},
}  # no_adapters: the full method on the base model (the library's ε1/ε2 off)
HAIR_EDITS = ("blonde_hair",)  # edits whose region reaches beyond the inner face: pasted with hair=True


def crops_of(frames: np.ndarray, tracks, size: int = 64) -> np.ndarray:
    """Aligned 64² face crops of every frame, with the ground-truth track's alignment."""
    transforms = alignment_transforms(tracks.tracks[0], size)
    return np.stack([crop_face(frame, transforms[i], size) for i, frame in enumerate(frames)])


def psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    diff = (a.astype(np.float64) - b.astype(np.float64))[keep]
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def through_vae(vae, crops: np.ndarray) -> np.ndarray:
    """Crops encoded and decoded by the model's VAE."""
    return decode_latents(vae, encode_frames(vae, crops))


def truth_through_vae(
    vae, source_crops: np.ndarray, source_reconstruction: np.ndarray, truth_crops: np.ndarray
) -> np.ndarray:
    """The true edited crops after the model's VAE, with the pipeline's detail transfer
    (``source_reconstruction``: :func:`through_vae` of the source crops)."""
    return transfer_detail(source_crops, through_vae(vae, truth_crops), source_reconstruction, device=vae.device)


def write_json(path: Path, results: dict) -> None:
    """Written whole or not at all: a reader polling a long run never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(results, indent=2))
    staging.replace(path)


def summary(rows: dict[str, list[float]]) -> dict:
    return {
        "attribute_success": round(float(np.mean(rows["success"])), 4),
        "id_sim_to_truth": round(float(np.mean(rows["id"])), 4),
        "id_sim_to_input": round(float(np.mean(rows["id_input"])), 4),
        "guide_sim_to_input": round(float(np.mean(rows["guide_input"])), 4),
        "psnr_outside_edit": round(float(np.mean(rows["psnr"])), 3),
        "warp_error": round(float(np.mean(rows["warp"])), 4),
        "seconds": round(float(np.mean(rows["seconds"])), 3),
        "edits": len(rows["success"]),
        "target_shown": round(float(np.mean(rows["target"])), 4),  # the two halves of attribute_success
        "others_kept": round(float(np.mean(rows["kept"])), 4),
    }


def crop_summary(rows: dict[str, list[float]]) -> dict:
    """A reference scored on crops alone: no frames, so no PSNR, warp error or seconds."""
    return {
        "attribute_success": round(float(np.mean(rows["success"])), 4),
        "id_sim_to_truth": round(float(np.mean(rows["id"])), 4),
        "id_sim_to_input": round(float(np.mean(rows["id_input"])), 4),
        "guide_sim_to_input": round(float(np.mean(rows["guide_input"])), 4),
        "edits": len(rows["success"]),
        "target_shown": round(float(np.mean(rows["target"])), 4),
        "others_kept": round(float(np.mean(rows["kept"])), 4),
    }


def paired_difference(ours: list[float], theirs: list[float]) -> dict:
    """Mean of ours − theirs over paired items, with a normal 95 % interval of that mean."""
    diff = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    mean = float(diff.mean())
    half = 1.96 * float(diff.std(ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {
        "mean_difference": round(mean, 4),
        "ci95": [round(mean - half, 4), round(mean + half, 4)],
        "items": len(diff),
    }


def both_edited(ours: dict[str, list[float]], theirs: dict[str, list[float]]) -> dict:
    """The identity difference on the (person, edit) items both methods edited successfully: a
    method that leaves more faces unedited keeps more of the input's identity, and this compares
    the two at equal work."""
    keep = [i for i, (a, b) in enumerate(zip(ours["success"], theirs["success"])) if a and b]
    return paired_difference([ours["id"][i] for i in keep], [theirs["id"][i] for i in keep])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many held-out people (tune settings on people the report does not use)",
    )
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="default: the shipped FaceWorld models")
    parser.add_argument("--oracles", type=Path, default=SHIPPED_MODELS / "oracles")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--edits", default=",".join(EDITS), help="comma-separated subset of " + ", ".join(EDITS))
    parser.add_argument("--guidance", type=float, default=None, help="default: the edit command's")
    parser.add_argument("--strength", type=float, default=None, help="default: the edit command's")
    parser.add_argument(
        "--adapter-weight",
        type=float,
        default=None,
        help="weight of each edit's ε2 adapter (default: the library's tuned weight)",
    )
    parser.add_argument(
        "--hair",
        choices=("auto", "on", "off"),
        default="auto",
        help="paste with the hair-extended mask: auto = for edits of the hair only",
    )
    parser.add_argument(
        "--source-prompt",
        choices=("caption", "empty"),
        default="caption",
        help="what the edit is told the input shows: its caption, or nothing",
    )
    parser.add_argument(
        "--no-detail-transfer", action="store_true", help="edit without putting the VAE's lost detail back"
    )
    parser.add_argument("--no-local-blend", action="store_true", help="let the edit change the whole face")
    parser.add_argument("--blend-threshold", type=float, default=None, help="default: the edit command's")
    parser.add_argument("--propagation-temperature", type=float, default=None, help="default: the edit command's")
    parser.add_argument("--temporal-smoothing", type=float, default=None, help="default: the edit command's")
    parser.add_argument("--all-keyframes-below", type=int, default=None, help="default: the edit command's")
    parser.add_argument("--keyframes", type=int, default=None, help="default: the edit command's")
    parser.add_argument("--inject-feature-until", type=int, default=None, help="default: the edit command's")
    parser.add_argument("--inject-attention-until", type=int, default=None, help="default: the edit command's")
    parser.add_argument("--identity-gradient", type=float, default=None, help="default: the edit command's")
    parser.add_argument("--identity-gradient-from", type=int, default=None, help="default: the edit command's")
    parser.add_argument("--attention-merge", type=float, default=None, help="default: the edit command's")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    methods = {m: METHODS[m] for m in args.methods.split(",") if m}  # none: the reference rows only
    edits = [EDITS[e] for e in args.edits.split(",")]
    overrides = {
        k: getattr(args, k)
        for k in (
            "guidance",
            "strength",
            "propagation_temperature",
            "temporal_smoothing",
            "keyframes",
            "all_keyframes_below",
            "identity_gradient",
            "identity_gradient_from",
            "inject_feature_until",
            "inject_attention_until",
            "attention_merge",
        )
        if getattr(args, k) is not None
    }
    if args.no_detail_transfer:
        overrides["detail_transfer"] = False
    if args.no_local_blend:
        overrides["local_blend"] = False
    if args.blend_threshold is not None:
        overrides["blend_threshold"] = args.blend_threshold

    pipe = load_pipeline(args.model, device=args.device)
    has_library = bool(pipe.adapter_library and pipe.adapter_library.edits)
    if not has_library:
        methods.pop("no_adapters", None)  # the same as full
    base = load_pipeline(args.model, device=args.device, adapter_library=False) if "no_adapters" in methods else None
    identity_net = FaceWorldIdentity.from_pretrained(args.oracles / "identity")
    guide_net = copy.deepcopy(pipe.identity_net()).cpu().float()  # what identity guidance optimises (never the oracle)
    oracle = AttributeOracle.from_pretrained(args.oracles / "attributes")
    work = Path(tempfile.mkdtemp(prefix="faceworld-quality-"))
    cache = InversionCache(work / "cache")
    rows = ("success", "id", "id_input", "guide_input", "psnr", "warp", "seconds", "target", "kept")
    scores = {m: {e.name: {k: [] for k in rows} for e in edits} for m in ["unedited", *methods]}
    reference_scores = {
        e.name: {k: [] for k in ("success", "id", "id_input", "guide_input", "target", "kept")} for e in edits
    }

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1

    def score_crops(
        s: dict, crops: np.ndarray, truth_crops: np.ndarray, source_crops: np.ndarray, target: str, source_calls: dict
    ) -> None:
        calls = {k: v.mean() > 0.5 for k, v in oracle.predict_proba(crops).items()}
        others_kept = all(calls[a] == source_calls[a] for a in ATTRIBUTE_NAMES if a != target)
        with torch.no_grad():
            embedding = identity_net(to_tensor(crops))
            sim = identity_net.similarity(embedding, identity_net(to_tensor(truth_crops)))
            s["id_input"].append(
                float(identity_net.similarity(embedding, identity_net(to_tensor(source_crops))).mean())
            )
            s["guide_input"].append(
                float(F.cosine_similarity(guide_net(to_tensor(crops)), guide_net(to_tensor(source_crops))).mean())
            )
        s["success"].append(float(calls[target] and others_kept))
        s["target"].append(float(calls[target]))
        s["kept"].append(float(others_kept))
        s["id"].append(float(sim.mean()))

    def score(
        s: dict,
        frames: np.ndarray,
        truth_frames: np.ndarray,
        truth_crops: np.ndarray,
        source_crops: np.ndarray,
        outside: np.ndarray,
        target: str,
        source_calls: dict,
        tracks,
        seconds: float,
    ) -> None:
        score_crops(s, crops_of(frames, tracks), truth_crops, source_crops, target, source_calls)
        change = np.diff(frames.astype(np.float64), axis=0) - np.diff(truth_frames.astype(np.float64), axis=0)
        s["psnr"].append(psnr(frames, truth_frames, np.repeat(outside[..., None], 3, axis=-1)))
        s["warp"].append(float(np.abs(change).mean()) if len(frames) > 1 else 0.0)
        s["seconds"].append(seconds)

    def merged(by_edit: dict) -> dict[str, list[float]]:
        return {k: [v for e in by_edit.values() for v in e[k]] for k in next(iter(by_edit.values()))}

    def report(done: list[int]) -> dict:
        """The report of the people done so far (written after each, so a cut-short run leaves its part)."""
        full = merged(scores["full"]) if "full" in scores else None
        return {
            "identities": done,
            "partial": len(done) < len(people),
            "frames": args.frames,
            "steps": args.steps,
            "model": args.model or "embedded FaceWorld default",
            "settings": overrides
            | {"hair": args.hair, "source_prompt": args.source_prompt, "adapter_weight": args.adapter_weight},
            "methods": {
                m: summary(merged(by_edit)) | {"by_edit": {e: summary(r) for e, r in by_edit.items() if r["success"]}}
                for m, by_edit in scores.items()
                if m != "unedited"
            },
            "comparisons": {
                f"full_vs_{m}": {
                    metric: paired_difference(full[key], merged(scores[m])[key])
                    for metric, key in (
                        ("id_sim_to_truth", "id"),
                        ("id_sim_to_input", "id_input"),
                        ("warp_error", "warp"),
                    )
                }
                | {"id_sim_to_truth_both_edited": both_edited(full, merged(scores[m]))}
                for m in methods
                if m != "full" and full is not None
            },
            "unedited": summary(merged(scores["unedited"])),
            # each (person, edit) item's scores, in the same order in every report, for paired comparisons
            "items": {
                m: {k: [round(float(v), 4) for v in values] for k, values in merged(by_edit).items()}
                for m, by_edit in scores.items()
            },
            "truth_through_vae": crop_summary(merged(reference_scores))
            | {"by_edit": {e: crop_summary(r) for e, r in reference_scores.items() if r["success"]}},
        }

    people = list(HELD_OUT_IDS)[args.offset : args.offset + args.identities]
    for person in people:
        clip = render_clip(person, seed=person, frames=args.frames, size=128, fps=12.0)
        source = write_video(work / f"{person}.mp4", iter(clip), clip.fps)
        tracks_path = clip.tracks.save(work / f"{person}.tracks.json")
        source_frames = read_frames(source)  # as the editor sees it: through the video codec
        source_crops = crops_of(source_frames, clip.tracks)
        source_reconstruction = through_vae(pipe.vae, source_crops)  # shared by the person's edits
        source_calls = {k: v.mean() > 0.5 for k, v in oracle.predict_proba(source_crops).items()}
        for edit in edits:
            if edit.is_noop(clip.attributes[0]):
                continue
            truth = clip.with_edit(edit)
            truth_frames = truth.array()
            truth_crops = crops_of(truth_frames, truth.tracks)
            outside = ~np.stack([truth.edit_mask(edit, i, dilate_px=3.0) for i in range(len(truth_frames))])
            prompt = edit.target_caption(clip.attributes[0])
            source_prompt = caption(clip.attributes[0]) if args.source_prompt == "caption" else ""
            hair = args.hair == "on" or (args.hair == "auto" and edit.name in HAIR_EDITS)
            common = (truth_frames, truth_crops, source_crops, outside, edit.name, source_calls, clip.tracks)
            score(scores["unedited"][edit.name], source_frames, *common, 0.0)
            score_crops(
                reference_scores[edit.name],
                truth_through_vae(pipe.vae, source_crops, source_reconstruction, truth_crops),
                truth_crops,
                source_crops,
                edit.name,
                source_calls,
            )
            for method, switches in methods.items():
                out = work / f"{person}-{edit.name}-{method}.mp4"
                started = time.perf_counter()
                weight = "" if args.adapter_weight is None else f":{args.adapter_weight:g}"
                adapters = f"{edit.name}{weight}" if has_library and method != "no_adapters" else "none"
                settings = EditSettings(
                    prompt=prompt,
                    source_prompt=source_prompt,
                    steps=args.steps,
                    hair=hair,
                    adapters=adapters,
                    **(overrides | switches),
                )
                edit_video(
                    source,
                    out,
                    settings,
                    pipeline=base if method == "no_adapters" else pipe,
                    tracks_path=tracks_path,
                    cache=cache,
                    log=lambda _m: None,
                )
                score(scores[method][edit.name], read_frames(out), *common, time.perf_counter() - started)
        print(f"identity {person}: done", flush=True)
        if args.json:
            write_json(args.json, report(people[: people.index(person) + 1]))
    results = report(people)

    print(
        f"{'method':<22}{'attr success':>14}{'id sim':>10}{'id in':>8}{'guide in':>10}{'psnr out':>10}{'warp err':>10}{'s/edit':>9}"
        f"{'shown':>8}{'kept':>8}"
    )
    for method, row in [*results["methods"].items(), ("unedited", results["unedited"])]:
        for name, sub in [(method, row), *((f"  {k}", v) for k, v in row.get("by_edit", {}).items())]:
            print(
                f"{name:<22}{sub['attribute_success']:>14.3f}{sub['id_sim_to_truth']:>10.3f}"
                f"{sub['id_sim_to_input']:>8.3f}{sub['guide_sim_to_input']:>10.3f}{sub['psnr_outside_edit']:>10.2f}{sub['warp_error']:>10.3f}{sub['seconds']:>9.2f}"
                f"{sub['target_shown']:>8.3f}{sub['others_kept']:>8.3f}"
            )
    for name, sub in [
        ("truth_through_vae", results["truth_through_vae"]),
        *((f"  {k}", v) for k, v in results["truth_through_vae"]["by_edit"].items()),
    ]:
        print(
            f"{name:<22}{sub['attribute_success']:>14.3f}{sub['id_sim_to_truth']:>10.3f}"
            f"{sub['id_sim_to_input']:>8.3f}{sub['guide_sim_to_input']:>10.3f}{'(crops)':>29}"
            f"{sub['target_shown']:>8.3f}{sub['others_kept']:>8.3f}"
        )
    for name, pair in results["comparisons"].items():
        print(
            name
            + ": "
            + ", ".join(
                f"{metric} {d['mean_difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
                for metric, d in pair.items()
            )
        )
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
