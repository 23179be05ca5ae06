"""Speed of the face stage: detection + landmarks + tracking + alignment (+ crop), frames/s.

Frames are decoded before timing, so the figures are the face stage alone. Each clip is timed
``--repeat`` times and the fastest run is reported (the least disturbed by other processes), with
the time split into mediapipe's detector, mediapipe's face mesh, the tracker's own work, the
smoothed alignment transforms and the aligned crops.

    .venv/bin/python benchmarks/face_speed.py [CLIP ...] [--size 512] [--repeat 3] [--json OUT.json]

Without clips it uses ../shared/data/clips/{closeup,jogger}.mp4, and also times the two side by
side (1024x512, two faces).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ipfacediff import face  # noqa: E402
from ipfacediff.video import read_frames  # noqa: E402

SHARED_CLIPS = REPO_ROOT.parent / "shared" / "data" / "clips"


class StageTimer:
    """Adds up the time spent in methods of face._FaceFinder while installed."""

    def __init__(self, **methods: str) -> None:
        self.methods = methods  # stage name -> method name
        self.seconds = dict.fromkeys(methods, 0.0)
        self.originals: dict[str, Callable] = {}

    def __enter__(self) -> StageTimer:
        for stage, name in self.methods.items():
            original = getattr(face._FaceFinder, name)
            self.originals[name] = original

            def timed(*args, _original=original, _stage=stage, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_stage] += time.perf_counter() - start

            setattr(face._FaceFinder, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.originals.items():
            setattr(face._FaceFinder, name, original)


def time_clip(frames: np.ndarray, size: int) -> dict[str, float]:
    """One timed pass; seconds per stage and in total."""
    with StageTimer(detect="detect", landmarks="landmarks") as timer:
        start = time.perf_counter()
        tracks = face.track_faces(iter(frames), fps=25.0)
        tracked = time.perf_counter()
    transforms = {t.id: face.alignment_transforms(t, size) for t in tracks.tracks}
    aligned = time.perf_counter()
    for track in tracks.tracks:
        for i in track.frames:
            face.crop_face(frames[i], transforms[track.id][i], size)
    cropped = time.perf_counter()
    return {
        "detect": timer.seconds["detect"],
        "landmarks": timer.seconds["landmarks"],
        "tracking": tracked - start - timer.seconds["detect"] - timer.seconds["landmarks"],
        "alignment": aligned - tracked,
        "crop": cropped - aligned,
        "total": cropped - start,
        "faces": sum(len(t.frames) for t in tracks.tracks),
        "tracks": len(tracks.tracks),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="*", type=Path)
    parser.add_argument("--size", type=int, default=512, help="aligned crop side")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    inputs: dict[str, np.ndarray] = {}
    clips = args.clips or [SHARED_CLIPS / "closeup.mp4", SHARED_CLIPS / "jogger.mp4"]
    for path in clips:
        if not path.is_file():
            print(f"face_speed: {path} not found; pass clips as arguments", file=sys.stderr)
            return 2
        inputs[path.name] = read_frames(path)
    if not args.clips:
        a, b = inputs["jogger.mp4"], inputs["closeup.mp4"]
        n = min(len(a), len(b))
        inputs["jogger|closeup (2 faces)"] = np.concatenate([a[:n], b[:n]], axis=2)

    face.track_faces(iter(next(iter(inputs.values()))[:2]), fps=25.0)  # load the models once
    rows = []
    for name, frames in inputs.items():
        runs = [time_clip(frames, args.size) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["total"])
        n = len(frames)
        rows.append(
            {
                "clip": name,
                "width": frames.shape[2],
                "height": frames.shape[1],
                "frames": n,
                "tracks": best["tracks"],
                "ms_per_frame": {
                    k: 1000 * best[k] / n for k in ("detect", "landmarks", "tracking", "alignment", "crop", "total")
                },
                "fps": n / best["total"],
                "fps_without_crop": n / (best["total"] - best["crop"]),
                "runs_fps": [n / r["total"] for r in runs],
            }
        )

    header = f"{'clip':26} {'size':>9} {'tracks':>6} {'detect':>7} {'mesh':>7} {'track':>7} {'align':>7} {'crop':>7} {'total':>7} {'fps':>6}"
    print(f"face stage, crop {args.size}px, {os.cpu_count()} CPUs, ms per frame (best of {args.repeat})")
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = r["ms_per_frame"]
        print(
            f"{r['clip']:26} {r['width']:>4}x{r['height']:<4} {r['tracks']:>6} {ms['detect']:7.2f} {ms['landmarks']:7.2f} "
            f"{ms['tracking']:7.2f} {ms['alignment']:7.2f} {ms['crop']:7.2f} {ms['total']:7.2f} {r['fps']:6.1f}"
        )
    if args.json:
        import mediapipe

        meta = {
            "crop_size": args.size,
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "mediapipe": mediapipe.__version__,
            "opencv": cv2.__version__,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
