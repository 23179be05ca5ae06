"""FaceWorld quality against the number of DDIM steps: faceworld_quality.py's reports at several
step counts side by side, each mean with its 95 % interval, each paired with the reference's on the
(person, edit) items both scored, and the UNet evaluations per frame each step count costs.

    python benchmarks/faceworld_quality.py --methods full --steps 30 --json s30.json   # one per count
    python benchmarks/steps_curve.py --runs 20=s20.json,30=s30.json,50=s50.json --reference 50 --json OUT.json

Intervals are normal 95 % intervals of the mean over the (person, edit) items (success is a share:
its interval is the binomial one by the same rule). Evaluations (one frame through one UNet, CFG's
two halves two) are counted on one FaceWorld person's 12-frame clip per edit with the shipped models,
as faceworld_quality.py edits it, and averaged over the edits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_speed import EvaluationCounter  # noqa: E402
from faceworld_quality import HAIR_EDITS, crops_of  # noqa: E402

from faceworld import EDITS, HELD_OUT_IDS, caption, render_clip  # noqa: E402
from ipfacediff.job import load_pipeline  # noqa: E402
from ipfacediff.settings import EditSettings  # noqa: E402

METRICS = ("success", "id", "id_input", "psnr", "warp")  # faceworld_quality.py's item rows: id = to the truth


def items_by_key(report: dict) -> dict[tuple[str, int], dict[str, float]]:
    """Each (edit, person) item's scores; faceworld_quality.py lists them edit by edit, person by
    person, leaving out the people an edit does not change."""
    items, people = report["items"]["full"], report["identities"]
    keys = [(edit, person) for edit in report["methods"]["full"]["by_edit"] for person in people]
    edits_of = {edit: summary["edits"] for edit, summary in report["methods"]["full"]["by_edit"].items()}
    if len(keys) != len(items["success"]) or any(n != len(people) for n in edits_of.values()):
        raise SystemExit("error: a report whose edits skip people: their items cannot be paired")
    return {key: {name: items[name][i] for name in METRICS} for i, key in enumerate(keys)}


def interval(values: list[float]) -> dict:
    x = np.asarray(values, dtype=np.float64)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return {
        "mean": round(float(x.mean()), 4),
        "ci95": [round(float(x.mean() - half), 4), round(float(x.mean() + half), 4)],
    }


def evaluations_per_frame(steps: int, frames: int = 12) -> float:
    pipe = load_pipeline(None, device="cpu")
    person = list(HELD_OUT_IDS)[0]
    clip = render_clip(person, seed=person, frames=frames, size=128, fps=12.0)
    crops = crops_of(clip.array(), clip.tracks, size=64)
    counts = []
    for edit in EDITS.values():
        if edit.is_noop(clip.attributes[0]):
            continue
        settings = EditSettings(
            prompt=edit.target_caption(clip.attributes[0]),
            source_prompt=caption(clip.attributes[0]),
            steps=steps,
            hair=edit.name in HAIR_EDITS,
            adapters=edit.name,
        )
        with EvaluationCounter(pipe) as counter:
            pipe(crops, settings)
        counts.append(counter.count / frames)
    return float(np.mean(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="STEPS=REPORT.json,… (faceworld_quality.py's --json)")
    parser.add_argument("--reference", required=True, help="the STEPS the others are paired with")
    parser.add_argument("--no-count", action="store_true", help="leave out the evaluation count (minutes)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs.split(","))
    reports = {label: json.loads(Path(path).read_text()) for label, path in runs.items()}
    keyed = {label: items_by_key(report) for label, report in reports.items()}
    reference = keyed[args.reference]
    results = {}
    for label, items in keyed.items():
        common = [key for key in items if key in reference]
        row = {
            "items": len(items),
            "identities": len(reports[label]["identities"]),
            **{name: interval([v[name] for v in items.values()]) for name in METRICS},
            f"minus_{args.reference}": {
                "items": len(common),
                **{name: interval([items[k][name] - reference[k][name] for k in common]) for name in METRICS},
            },
        }
        if not args.no_count:
            row["unet_evaluations_per_frame"] = round(evaluations_per_frame(int(label)), 2)
        results[label] = row
    header = f"{'steps':>6}{'items':>6}" + "".join(f"{name:>24}" for name in METRICS) + f"{'evals/frame':>12}"
    print(header)
    for label, row in results.items():
        cells = "".join(
            f"{row[n]['mean']:>8.3f} [{row[n]['ci95'][0]:.3f}, {row[n]['ci95'][1]:.3f}]".rjust(24) for n in METRICS
        )
        print(f"{label:>6}{row['items']:>6}{cells}{row.get('unet_evaluations_per_frame', float('nan')):>12.1f}")
    print(f"paired with {args.reference} steps, on the items both scored (mean difference [95 % interval]):")
    for label, row in results.items():
        pair = row[f"minus_{args.reference}"]
        cells = "".join(
            f"{pair[n]['mean']:+8.3f} [{pair[n]['ci95'][0]:+.3f}, {pair[n]['ci95'][1]:+.3f}]".rjust(24) for n in METRICS
        )
        print(f"{label:>6}{pair['items']:>6}{cells}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"reference": args.reference, "runs": runs, "curve": results}, indent=2))


if __name__ == "__main__":
    main()
