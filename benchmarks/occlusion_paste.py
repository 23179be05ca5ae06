"""The paste-back over an occluder on real clips (#36): closeup.mp4 and jogger.mp4 with a drawn
hand passing over the face, a drawn microphone rising to the mouth and a drawn mug raised to it,
pasted with a synthetic edit (a fine ±60 checkerboard over the whole crop, see
tests/test_occlusion.py) with and without the occlusion mask. Prints the share of occluder pixels
inside the face mask that the paste changed by more than 8/255, the share of the uncovered face
changed (the edit still lands there), the mask's cost per frame, and the false positives: the
share of face-mask pixels the mask covers on the clean clips and on FaceWorld clips of held-out
people (their glasses, hats and beards belong to the face). ``--segmenter DIR`` adds a segmenter
trained by benchmarks/train_occluder.py (without closeup.mp4; jogger.mp4's frames were among its
faces) to the hand landmarker's mask.

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

from ipfacediff.face import CANONICAL_FACE_ELLIPSE, alignment_transforms, crop_face, face_mask, paste_face, track_faces  # noqa: E402
from ipfacediff.occlusion import LOOK_SIDE, OcclusionFinder, grown_region  # noqa: E402

SEGMENTER = None  # an OccluderSegmenter folder's model, with --segmenter
_cx, _cy, _rx, _ry = CANONICAL_FACE_ELLIPSE
CANONICAL_FACE = cv2.ellipse(
    np.zeros((LOOK_SIDE, LOOK_SIDE), np.uint8),
    (round(_cx * LOOK_SIDE), round(_cy * LOOK_SIDE)),
    (round(_rx * LOOK_SIDE), round(_ry * LOOK_SIDE)),
    0, 0, 360, 1, -1,
)  # fmt: skip


class Finder(OcclusionFinder):
    """The shipped masks, with SEGMENTER's regions (inside the canonical face ellipse) added where one is given."""

    def mask(self, frame, M, size, key=0):
        hands = super().mask(frame, M, size, key)
        if SEGMENTER is None:
            return hands
        crop = crop_face(frame, M * (LOOK_SIDE / size), LOOK_SIDE)
        region = SEGMENTER.regions(crop[None], CANONICAL_FACE[None])[0]
        return np.maximum(hands, grown_region(region, size)) if region.any() else hands


from ipfacediff.video import iter_frames  # noqa: E402

CLIPS = ROOT.parent / "shared" / "data" / "clips"
SIZE = 512
FACEWORLD_IDS = (1000, 1003, 1007, 1011, 1016)


def draw_microphone(
    frame: np.ndarray, top: tuple[float, float], length: float, radius: float = 42
) -> tuple[np.ndarray, np.ndarray]:
    """A hand-held microphone: a dark handle and a grey ball of mesh at its top."""
    out, shape = frame.copy(), np.zeros(frame.shape[:2], np.uint8)
    x, y, r = round(top[0]), round(top[1]), max(3, round(radius))
    bottom = (round(top[0] + 0.25 * length), round(top[1] + length))
    cv2.line(out, (x, y), bottom, (30, 30, 34), max(2, round(36 / 42 * r)))
    cv2.line(shape, (x, y), bottom, 1, max(2, round(36 / 42 * r)))
    cv2.circle(out, (x, y), r, (120, 120, 125), -1)
    cv2.circle(shape, (x, y), r, 1, -1)
    grille = np.zeros_like(shape)
    for k in range(-r, r + 1, max(2, r // 6)):
        cv2.line(grille, (x + k, y - r), (x + k, y + r), 1, 1)
        cv2.line(grille, (x - r, y + k), (x + r, y + k), 1, 1)
    ball = np.zeros_like(shape)
    cv2.circle(ball, (x, y), r, 1, -1)
    out[(grille & ball) > 0] = (70, 70, 74)
    return out, shape > 0


def draw_mug(frame: np.ndarray, rim: tuple[float, float], width: float) -> tuple[np.ndarray, np.ndarray]:
    """A mug held up to the mouth: a cream body shaded across, a darker rim ellipse, a handle ring."""
    out, shape = frame.astype(np.float32), np.zeros(frame.shape[:2], np.uint8)
    x, y, w = rim[0], rim[1], width
    body = np.array([[x - w / 2, y], [x + w / 2, y], [x + 0.45 * w, y + 1.1 * w], [x - 0.45 * w, y + 1.1 * w]])
    cv2.fillPoly(shape, [np.round(body).astype(np.int32)], 1)
    cv2.ellipse(shape, (round(x), round(y + 1.1 * w)), (round(0.45 * w), round(0.1 * w)), 0, 0, 180, 1, -1)
    handle = np.zeros_like(shape)
    cv2.ellipse(
        handle,
        (round(x + 0.5 * w), round(y + 0.5 * w)),
        (round(0.25 * w), round(0.3 * w)),
        0,
        -90,
        90,
        1,
        max(2, round(0.1 * w)),
    )
    shape |= handle
    across = np.clip((np.arange(frame.shape[1]) - (x - w / 2)) / w, 0, 1)
    colour = np.array([236, 226, 205], np.float32) * (0.75 + 0.25 * np.sin(np.pi * across))[None, :, None]
    out[shape > 0] = np.broadcast_to(colour, out.shape)[shape > 0]
    rim_mask = np.zeros_like(shape)
    cv2.ellipse(rim_mask, (round(x), round(y)), (round(w / 2), round(0.12 * w)), 0, 0, 360, 1, -1)
    out[rim_mask > 0] = (120, 70, 50)
    shape |= rim_mask
    return out.astype(np.uint8), shape > 0


def face_frame(M: np.ndarray, x: float, y: float) -> tuple[np.ndarray, float]:
    """The frame point of canonical crop point (x, y) of transform ``M`` and the frame pixels per crop side."""
    inverse = cv2.invertAffineTransform(M)
    point = inverse[:, :2] @ np.array([x * SIZE, y * SIZE]) + inverse[:, 2]
    return point, SIZE / math.sqrt(abs(np.linalg.det(M[:, :2])))


def scenes(clean: list[np.ndarray], transforms: list[np.ndarray]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    count = len(clean)
    hand, microphone, mug = [], [], []
    for i, (f, M) in enumerate(zip(clean, transforms)):
        t = i / (count - 1)
        centre, side = face_frame(M, 0.2 + 0.55 * t, 0.58 + 0.04 * math.sin(i / 4))
        hand.append(draw_hand(f, tuple(centre), 0.27 * side, 0.15 * math.sin(i / 3)))
        top, _ = face_frame(M, 0.55, 1.0 - 0.27 * t)
        microphone.append(draw_microphone(f, tuple(top), 0.5 * side, 0.08 * side))
        rim, _ = face_frame(M, 0.5, 1.05 - 0.3 * t)
        mug.append(draw_mug(f, tuple(rim), 0.26 * side))
    return {"hand": hand, "microphone": microphone, "mug": mug}


def measure(frames, occluders, track, transforms) -> dict:
    finder, seconds = Finder(), 0.0
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
        reach = 2 * round(0.06 * face_frame(M, 0.5, 0.5)[1]) + 1  # 61 px on closeup.mp4
        near = cv2.dilate(occluder.astype(np.uint8), np.ones((reach, reach), np.uint8)) > 0
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


def false_positives(frames, track, transforms, size: int) -> dict:
    """How much of the face mask the occlusion mask covers on a clip with nothing in front of the face."""
    shares = []
    with Finder() as finder:
        for index, M in sorted(transforms.items()):
            frame = frames[index]
            mask = face_mask(track, index, M, size) > 0.5
            shares.append(float((finder.mask(frame, M, size, key=track.id)[mask] > 0).mean()))
    return {
        "frames": len(shares),
        "frames_with_a_mask": sum(s > 0 for s in shares),
        "face_share_covered_mean": round(float(np.mean(shares)), 5),
        "face_share_covered_max": round(float(np.max(shares)), 5),
    }


def faceworld_clean(frames: int) -> dict:
    from faceworld.scene import random_attributes, render_clip

    rng = np.random.default_rng(36)
    per_clip = []
    for k, identity in enumerate(FACEWORLD_IDS):
        clip = render_clip(identity, random_attributes(rng), seed=k, frames=frames, size=256)
        video = list(clip)
        track = clip.tracks.tracks[0]
        per_clip.append(false_positives(video, track, alignment_transforms(track, 256), 256))
    return {
        "clips": len(per_clip),
        "frames": sum(c["frames"] for c in per_clip),
        "frames_with_a_mask": sum(c["frames_with_a_mask"] for c in per_clip),
        "face_share_covered_mean": round(float(np.mean([c["face_share_covered_mean"] for c in per_clip])), 5),
        "face_share_covered_max": max(c["face_share_covered_max"] for c in per_clip),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--clips", default="closeup.mp4,jogger.mp4")
    parser.add_argument("--faceworld-frames", type=int, default=10)
    parser.add_argument("--segmenter", type=Path, help="an OccluderSegmenter folder (benchmarks/train_occluder.py)")
    args = parser.parse_args()
    if args.segmenter:
        global SEGMENTER
        from ipfacediff.models.segmenter import load_occluder_segmenter

        SEGMENTER = load_occluder_segmenter(args.segmenter)
    results: dict = {"size": SIZE, "segmenter": str(args.segmenter) if args.segmenter else None}
    print(
        f"{'clip':<12} {'scene':<11} {'occluder changed: on':>21} {'off':>6} {'rest of face: on':>17} {'off':>6} {'s/frame':>8}"
    )
    for name in args.clips.split(","):
        clean = list(iter_frames(CLIPS / name))
        track = track_faces(clean, fps=10.0).tracks[0]
        by_frame = alignment_transforms(track, SIZE)
        transforms = [by_frame[f] for f in range(len(clean))]
        per_clip = {
            scene: measure(*zip(*drawn), track, transforms) for scene, drawn in scenes(clean, transforms).items()
        }
        per_clip["clean"] = false_positives(clean, track, by_frame, SIZE)
        results[name] = {"frames": len(clean), **per_clip}
        for scene in ("hand", "microphone", "mug"):
            r = per_clip[scene]
            print(
                f"{name:<12} {scene:<11} {r['occluder_changed_with_occlusion']:>21.3f} {r['occluder_changed_without']:>6.3f} "
                f"{r['uncovered_face_changed_with_occlusion']:>17.3f} {r['uncovered_face_changed_without']:>6.3f} "
                f"{r['mask_seconds_per_frame']:>8.4f}"
            )
        c = per_clip["clean"]
        print(
            f"{name:<12} clean: {c['frames_with_a_mask']} of {c['frames']} frames with a mask, "
            f"face covered mean {c['face_share_covered_mean']:.5f} max {c['face_share_covered_max']:.5f}"
        )
    if args.faceworld_frames:
        fw = results["faceworld_held_out"] = faceworld_clean(args.faceworld_frames)
        print(
            f"FaceWorld held-out clean: {fw['frames_with_a_mask']} of {fw['frames']} frames with a mask, "
            f"face covered mean {fw['face_share_covered_mean']:.5f} max {fw['face_share_covered_max']:.5f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
