"""Time of an edit of part of a clip against the whole clip: only the range is inverted and edited.

    python benchmarks/range_speed.py [--clip ../shared/data/clips/closeup.mp4] [--json OUT.json]

Tiny random models of the real classes at 64² crops on the CPU by default (``--model`` for
others); each run gets a fresh inversion cache, so both pay for their inversion. ``--repeat N``
alternates the two N times and keeps each one's median, so that a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ipfacediff.diffusion import InversionCache  # noqa: E402
from ipfacediff.job import edit_video, load_pipeline  # noqa: E402
from ipfacediff.models import build_tiny_models  # noqa: E402
from ipfacediff.settings import EditSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=ROOT.parent / "shared" / "data" / "clips" / "closeup.mp4")
    parser.add_argument("--model", default=None, help="default: tiny random models, built in a temporary folder")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--start", default="1")
    parser.add_argument("--end", default="2")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; the median is kept")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="range-speed-"))
    model = args.model or str(build_tiny_models(work / "tiny", seed=0))
    pipe = load_pipeline(model, device="cpu", dtype="float32")
    timed: dict[str, list[dict]] = {"whole": [], "range": []}
    for attempt in range(args.repeat):
        for name, extra in [("whole", {}), ("range", {"start": args.start, "end": args.end})]:
            settings = EditSettings(
                prompt="a face with eyeglasses", steps=args.steps, resolution=args.resolution, **extra
            )
            started = time.perf_counter()
            report = edit_video(
                args.clip,
                work / f"{name}.mp4",
                settings,
                pipeline=pipe,
                cache=InversionCache(work / f"cache-{name}-{attempt}"),
                log=lambda _m: None,
            )
            timed[name].append(
                {
                    "seconds": round(time.perf_counter() - started, 3),
                    "frames_edited": report.faces[0]["frames"],
                    "stages": report.seconds,
                }
            )
            print(f"{name:<6} {timed[name][-1]['seconds']:8.2f} s  {timed[name][-1]['frames_edited']} frames edited")
    runs = {}
    for name, rows in timed.items():
        median = sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]
        runs[name] = median | {"all_seconds": [r["seconds"] for r in rows]}
    results = {
        "clip": args.clip.name,
        "model": args.model or "tiny random",
        "resolution": args.resolution,
        "steps": args.steps,
        "range": [args.start, args.end],
        "runs": runs,
        "ratios": {"range_over_whole": round(runs["range"]["seconds"] / runs["whole"]["seconds"], 3)},
    }
    print("range over whole:", results["ratios"]["range_over_whole"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
