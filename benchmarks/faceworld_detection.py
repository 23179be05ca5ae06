"""Does mediapipe find FaceWorld's cartoon faces? Detection against FaceWorld's ground-truth tracks.

    python benchmarks/faceworld_detection.py [--clips 10] [--frames 24] [--size 256] [--json OUT.json]

FaceWorld edits run on the ground-truth tracks (``ipfacediff edit --tracks``), so they do not
depend on a detector trained on photographs; this measures what happens without them, on scene
clips of held-out people (one or two moving faces each). Per true face and frame: found (a
detected track's box overlaps it with IoU >= 0.5), the box IoU, and the error of the five
alignment points in units of the true inter-ocular distance. Printed as a table, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfacediff.face import box_iou, detect_video_faces  # noqa: E402
from faceworld import HELD_OUT_IDS, render_clip  # noqa: E402
from ipfacediff.video import write_video  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=10)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="faceworld-detection-"))
    ids = list(HELD_OUT_IDS)
    found, ious, point_errors, faces_per_clip, seconds = [], [], [], [], 0.0
    for index in range(args.clips):
        people = [ids[2 * index]] if index % 2 == 0 else [ids[2 * index], ids[2 * index + 1]]
        clip = render_clip(people, seed=100 + index, frames=args.frames, size=args.size)
        video = write_video(work / f"{index}.mp4", iter(clip), clip.fps)
        started = time.perf_counter()
        detected = detect_video_faces(video)
        seconds += time.perf_counter() - started
        faces_per_clip.append([len(clip.tracks.tracks), len(detected.tracks)])
        for truth in clip.tracks.tracks:
            for position, frame in enumerate(truth.frames):
                box = truth.boxes[position]
                best, best_iou = None, 0.0
                for track in detected.tracks:
                    at = track.position(frame)
                    if at is not None and (overlap := float(box_iou(box, track.boxes[at])[0, 0])) > best_iou:
                        best, best_iou = (track, at), overlap
                hit = best is not None and best_iou >= 0.5
                found.append(hit)
                ious.append(best_iou)
                if hit:
                    true_points = np.asarray(truth.points[position])
                    ocular = np.linalg.norm(true_points[0] - true_points[1])
                    error = np.linalg.norm(np.asarray(best[0].points[best[1]]) - true_points, axis=1).mean()
                    point_errors.append(float(error / ocular))
    results = {
        "clips": args.clips,
        "frames": args.frames,
        "size": args.size,
        "faces_found": round(float(np.mean(found)), 4),
        "mean_box_iou": round(float(np.mean(ious)), 4),
        "point_error_interocular": round(float(np.mean(point_errors)), 4) if point_errors else None,
        "tracks_true_vs_detected": faces_per_clip,
        "fps": round(len(found) / seconds, 1) if seconds else None,
    }
    print(f"{'faces found':<26}{results['faces_found']:.3f}")
    print(f"{'mean box IoU':<26}{results['mean_box_iou']:.3f}")
    print(f"{'5-point error / IOD':<26}{results['point_error_interocular']}")
    print(f"{'tracks (true, detected)':<26}{faces_per_clip}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
