"""The paste-back over an occluder on a real clip (#36): closeup.mp4 with a drawn hand passing
over the face, and with a drawn microphone rising to the mouth, pasted with a synthetic edit (a
fine ±60 checkerboard over the whole crop, see tests/test_occlusion.py) with and without the
occlusion mask. Prints the share of occluder pixels inside the face mask that the paste changed
by more than 8/255, the share of the uncovered face changed (the edit still lands there), the
mask on the clean clip, and the mask's cost per frame.

The face tracks come from the clean clip (tracking through occluders is a separate piece of work).

    OMP_NUM_THREADS=1 python benchmarks/occlusion_paste.py --json benchmarks/results/occlusion_paste_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_occlusion import draw_hand, synthetic_edit  # noqa: E402

from ipfacediff.face import alignment_transforms, crop_face, face_mask, paste_face, track_faces  # noqa: E402
from ipfacediff.occlusion import OcclusionFinder  # noqa: E402
from ipfacediff.video import iter_frames  # noqa: E402

CLIP = ROOT.parent / "shared" / "data" / "clips" / "closeup.mp4"
SIZE = 512


def draw_microphone(frame: np.ndarray, top: tuple[float, float], length: float) -> tuple[np.ndarray, np.ndarray]:
    """A hand-held microphone: a dark handle and a grey ball of mesh at its top."""
    out, shape = frame.copy(), np.zeros(frame.shape[:2], np.uint8)
    x, y = top
    cv2.line(out, (round(x), round(y)), (round(x + 0.25 * length), round(y + length)), (30, 30, 34), 36)
    cv2.line(shape, (round(x), round(y)), (round(x + 0.25 * length), round(y + length)), 1, 36)
    cv2.circle(out, (round(x), round(y)), 42, (120, 120, 125), -1)
    cv2.circle(shape, (round(x), round(y)), 42, 1, -1)
    grille = np.zeros_like(shape)
    for k in range(-42, 43, 7):
        cv2.line(grille, (round(x) + k, round(y) - 42), (round(x) + k, round(y) + 42), 1, 1)
        cv2.line(grille, (round(x) - 42, round(y) + k), (round(x) + 42, round(y) + k), 1, 1)
    ball = np.zeros_like(shape)
    cv2.circle(ball, (round(x), round(y)), 42, 1, -1)
    out[(grille & ball) > 0] = (70, 70, 74)
    return out, shape > 0


def scenes(clean: list[np.ndarray]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    count = len(clean)
    hand = [
        draw_hand(f, (120 + 280 * i / (count - 1), 300 + 20 * math.sin(i / 4)), 140, 0.15 * math.sin(i / 3))
        for i, f in enumerate(clean)
    ]
    microphone = [draw_microphone(f, (300, 520 - 140 * i / (count - 1)), 260) for i, f in enumerate(clean)]
    return {"hand": hand, "microphone": microphone}


def measure(frames, occluders, track, transforms) -> dict:
    finder, seconds = OcclusionFinder(), 0.0
    changed = {True: [], False: []}
    edited_face = {True: [], False: []}
    for index, (frame, occluder) in enumerate(zip(frames, occluders)):
        M = transforms[index]
        started = time.perf_counter()
        occlusion = finder.mask(frame, M, SIZE, key=track.id)
        seconds += time.perf_counter() - started
        mask = face_mask(track, index, M, SIZE)
        inside = cv2.warpAffine(mask, cv2.invertAffineTransform(M), frame.shape[1::-1]) > 0.5
        edit = synthetic_edit(crop_face(frame, M, SIZE))
        near = cv2.dilate(occluder.astype(np.uint8), np.ones((61, 61), np.uint8)) > 0
        for on in (True, False):
            out = paste_face(frame, edit, M, mask, occlusion=occlusion if on else None)
            moved = np.abs(out.astype(int) - frame).max(-1) > 8
            if (occluder & inside).any():
                changed[on].append(float(moved[occluder & inside].mean()))
            edited_face[on].append(float(moved[inside & ~near].mean()))
    finder.close()
    return {
        "frames_with_occluder_on_face": len(changed[True]),
        "occluder_changed_with_occlusion": round(float(np.mean(changed[True])), 4),
        "occluder_changed_without": round(float(np.mean(changed[False])), 4),
        "uncovered_face_changed_with_occlusion": round(float(np.mean(edited_face[True])), 4),
        "uncovered_face_changed_without": round(float(np.mean(edited_face[False])), 4),
        "mask_seconds_per_frame": round(seconds / len(frames), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    clean = list(iter_frames(CLIP))
    track = track_faces(clean, fps=10.0).tracks[0]
    by_frame = alignment_transforms(track, SIZE)
    transforms = [by_frame[f] for f in range(len(clean))]
    results = {name: measure(*zip(*drawn), track, transforms) for name, drawn in scenes(clean).items()}
    with OcclusionFinder() as finder:
        covered = [float((finder.mask(f, M, SIZE) > 0).mean()) for f, M in zip(clean, transforms)]
    results["clean"] = {"frames_with_a_mask": sum(c > 0 for c in covered), "largest_share_of_crop": max(covered)}
    print(f"{'scene':<11} {'occluder changed: on':>21} {'off':>6} {'rest of face: on':>17} {'off':>6} {'s/frame':>8}")
    for name in ("hand", "microphone"):
        r = results[name]
        print(
            f"{name:<11} {r['occluder_changed_with_occlusion']:>21.3f} {r['occluder_changed_without']:>6.3f} "
            f"{r['uncovered_face_changed_with_occlusion']:>17.3f} {r['uncovered_face_changed_without']:>6.3f} "
            f"{r['mask_seconds_per_frame']:>8.4f}"
        )
    print(f"clean clip: {results['clean']['frames_with_a_mask']} of {len(clean)} frames with a mask")
    if args.json:
        args.json.write_text(json.dumps({"clip": CLIP.name, "size": SIZE, "frames": len(clean), **results}, indent=2))


if __name__ == "__main__":
    main()
