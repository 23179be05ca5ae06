"""Oracle scoring on FaceWorld: held-out people × the four edits, for the full method and its ablations.

    python benchmarks/faceworld_quality.py --json OUT.json [--identities 20] [--frames 12] [--steps 20]
        [--model DIR] [--oracles DIR]

Every edit has a ground truth: FaceWorld re-renders the same clip with only the attribute changed.
Per method (full, --no-identity-guidance, --every-frame) it reports
- attribute_success: share of (person, edit) whose edited face crops the attribute oracle calls
  positive for the target attribute (mean probability > 0.5) with every other attribute's call
  unchanged from the input;
- id_sim_to_truth: cosine of the FaceWorld identity net between edited and ground-truth crops;
- psnr_outside_edit: PSNR (dB) to the ground truth outside the edit's region (dilated 3 px);
- warp_error: mean |Δ_t edited − Δ_t truth|, Δ_t the change from frame t to t+1 (0–255): the
  flicker the edit adds that the true edit does not have (the renderer knows the motion exactly);
- seconds: mean time of one edit (inversion shared through the cache, as in real use).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfacediff.diffusion import InversionCache  # noqa: E402
from ipfacediff.faceworld import EDITS, HELD_OUT_IDS, render_clip  # noqa: E402
from ipfacediff.faceworld.oracles import ATTRIBUTE_NAMES, AttributeOracle, FaceWorldIdentity  # noqa: E402
from ipfacediff.face import alignment_transforms, crop_face  # noqa: E402
from ipfacediff.job import SHIPPED_MODELS, EditSettings, edit_video, load_pipeline  # noqa: E402
from ipfacediff.video import read_frames, write_video  # noqa: E402

METHODS = {"full": {}, "no_identity_guidance": {"identity_guidance": False}, "every_frame": {"every_frame": True}}


def crops_of(frames: np.ndarray, tracks, size: int = 64) -> np.ndarray:
    """Aligned 64² face crops of every frame, with the ground-truth track's alignment."""
    transforms = alignment_transforms(tracks.tracks[0], size)
    return np.stack([crop_face(frame, transforms[i], size) for i, frame in enumerate(frames)])


def psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    diff = (a.astype(np.float64) - b.astype(np.float64))[keep]
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="default: the shipped FaceWorld models")
    parser.add_argument("--oracles", type=Path, default=SHIPPED_MODELS / "oracles")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device)
    identity_net = FaceWorldIdentity.from_pretrained(args.oracles / "identity")
    oracle = AttributeOracle.from_pretrained(args.oracles / "attributes")
    work = Path(tempfile.mkdtemp(prefix="faceworld-quality-"))
    cache = InversionCache(work / "cache")
    scores: dict[str, dict[str, list[float]]] = {m: {k: [] for k in ("success", "id", "psnr", "warp", "seconds")}
                                                 for m in METHODS}
    people = list(HELD_OUT_IDS)[: args.identities]
    for person in people:
        clip = render_clip(person, seed=person, frames=args.frames, size=128, fps=12.0)
        source = write_video(work / f"{person}.mp4", iter(clip), clip.fps)
        tracks_path = clip.tracks.save(work / f"{person}.tracks.json")
        source_crops = crops_of(clip.array(), clip.tracks)
        source_calls = {k: v.mean() > 0.5 for k, v in oracle.predict_proba(source_crops).items()}
        for edit in EDITS.values():
            truth = clip.with_edit(edit)
            if edit.is_noop(clip.attributes[0]):
                continue
            truth_frames = truth.array()
            truth_crops = crops_of(truth_frames, truth.tracks)
            outside = ~np.stack([truth.edit_mask(edit, i, dilate_px=3.0) for i in range(len(truth_frames))])
            prompt = edit.target_caption(clip.attributes[0])
            for method, switches in METHODS.items():
                out = work / f"{person}-{edit.name}-{method}.mp4"
                started = time.perf_counter()
                edit_video(source, out, EditSettings(prompt=prompt, steps=args.steps, **switches), pipeline=pipe,
                           tracks_path=tracks_path, cache=cache, log=lambda _m: None)
                seconds = time.perf_counter() - started
                edited = read_frames(out)
                edited_crops = crops_of(edited, clip.tracks)
                calls = {k: v.mean() > 0.5 for k, v in oracle.predict_proba(edited_crops).items()}
                target = edit.name
                others_kept = all(calls[a] == source_calls[a] for a in ATTRIBUTE_NAMES if a != target)
                with torch.no_grad():
                    to_tensor = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
                    sim = identity_net.similarity(identity_net(to_tensor(edited_crops)), identity_net(to_tensor(truth_crops)))
                change = np.diff(edited.astype(np.float64), axis=0) - np.diff(truth_frames.astype(np.float64), axis=0)
                s = scores[method]
                s["success"].append(float(calls[target] and others_kept))
                s["id"].append(float(sim.mean()))
                s["psnr"].append(psnr(edited, truth_frames, np.repeat(outside[..., None], 3, axis=-1)))
                s["warp"].append(float(np.abs(change).mean()) if len(edited) > 1 else 0.0)
                s["seconds"].append(seconds)
        print(f"identity {person}: done", flush=True)

    results = {
        "identities": people, "frames": args.frames, "steps": args.steps, "model": args.model or "embedded FaceWorld default",
        "methods": {
            method: {
                "attribute_success": round(float(np.mean(s["success"])), 4),
                "id_sim_to_truth": round(float(np.mean(s["id"])), 4),
                "psnr_outside_edit": round(float(np.mean(s["psnr"])), 3),
                "warp_error": round(float(np.mean(s["warp"])), 4),
                "seconds": round(float(np.mean(s["seconds"])), 3),
                "edits": len(s["success"]),
            }
            for method, s in scores.items()
        },
    }
    print(f"{'method':<22}{'attr success':>14}{'id sim':>10}{'psnr out':>10}{'warp err':>10}{'s/edit':>9}")
    for method, row in results["methods"].items():
        print(f"{method:<22}{row['attribute_success']:>14.3f}{row['id_sim_to_truth']:>10.3f}"
              f"{row['psnr_outside_edit']:>10.2f}{row['warp_error']:>10.3f}{row['seconds']:>9.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
