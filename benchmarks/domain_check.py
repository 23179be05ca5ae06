"""The in-domain check of a model card (ipfacediff/domain.py): its scores on FaceWorld and real faces.

    python benchmarks/domain_check.py [--json benchmarks/results/domain_check.json] [--model DIR]
        [--threshold DB] [--people 20] [--edits 2] [--real-clips ../shared/data/clips] [--photos IMG ...]
        [--write-card]

Every face is scored as an edit would check it (ipfacediff.domain.check_track: up to 16 aligned 64²
crops spread over the track, the median decides) against the model card's threshold (or
--threshold). The faces, each with what the check must say:

- must pass: the quality benchmark's held-out clips (people 1000–1019, 12 frames at 128², through
  the video codec, ground-truth tracks) as they are and with each of the four edits applied (a user
  may edit an edited clip); the tool's own edits of the first --edits people (the video
  ``ipfacediff edit`` writes); scene clips of held-out people at 128–512 px, one or two moving faces
  with random attributes, a wide frame, and the clip ``ipfacediff faceworld render clip`` makes;
- must refuse: the shared real clips (closeup.mp4, jogger.mp4, faces found by the project's detector,
  as ``ipfacediff edit`` finds them) and --photos (still images panned into 12-frame clips);
- should refuse (being refused is the safe side): the real clips shrunk to 256² and 128², blurred,
  JPEG-10, grey, darkened, brightened; the real clips through OpenCV's stylisation, edge-preserving
  and pencil filters and a k-means cartoon filter (drawn faces of another style); black, grey and
  white crops, noise, an emoji.

The cost: seconds of the check of one track (16 crops and the edit's 12) against the seconds of a
FaceWorld edit of a 12-frame clip at 20 steps (first edit of the clip, with its inversion, and an
edit from the inversion cache). --write-card writes the card into the model folder with the
threshold and the measured margins (in_domain_min: lowest must-pass median; out_of_domain_max:
highest must-refuse or should-refuse median of a real face).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _shown(path: Path) -> str:
    """A path as the results file records it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


sys.path.insert(0, str(ROOT))

from ipfacediff.diffusion import InversionCache  # noqa: E402
from ipfacediff.domain import (  # noqa: E402
    MODEL_CARD,
    SAMPLE,
    ModelCard,
    check_track,
    sample_indices,
    vae_round_trip_parts,
)
from ipfacediff.face import FaceTracks, alignment_transforms, crop_face  # noqa: E402
from faceworld import EDITS, HELD_OUT_IDS, caption, random_attributes, render_clip  # noqa: E402
from ipfacediff.files import write_json  # noqa: E402
from ipfacediff.job import SHIPPED_MODELS, edit_video, face_crops, load_pipeline  # noqa: E402
from ipfacediff.settings import EditSettings  # noqa: E402
from ipfacediff.video import probe_video, read_frames, write_video  # noqa: E402

SIZE = 64


def track_crops(frames: np.ndarray, tracks: FaceTracks) -> list[np.ndarray]:
    """Every track's aligned crops, as the edit cuts them (smoothed alignment, crop_face)."""
    out = []
    for track in tracks.tracks:
        transforms = alignment_transforms(track, SIZE)
        out.append(np.stack([crop_face(frames[f], transforms[f], SIZE) for f in track.frames]))
    return out


def scaled(tracks: FaceTracks, factor: float) -> FaceTracks:
    """The tracks of the same video scaled by ``factor`` (only the points matter for the crops)."""
    copy = FaceTracks.from_json(json.loads(json.dumps(tracks.to_json())))
    for track in copy.tracks:
        track.points = [np.asarray(p) * factor for p in track.points]
    return copy


def cartoon_filter(image: np.ndarray) -> np.ndarray:
    """k-means colour quantisation with dark edges: a common "cartoonify" filter."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1.0)
    _, labels, centres = cv2.kmeans(pixels, 8, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
    flat = centres[labels.flatten()].reshape(image.shape).astype(np.uint8)
    grey = cv2.medianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 7)
    edges = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 5)
    return cv2.bitwise_and(flat, flat, mask=edges)


REAL_VARIANTS = {  # name: (kind, frame -> frame)
    "shrunk to 256": ("should_refuse", lambda f: cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA)),
    "shrunk to 128": ("should_refuse", lambda f: cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA)),
    "blurred": ("should_refuse", lambda f: cv2.GaussianBlur(f, (0, 0), 4)),
    "jpeg 10": ("should_refuse", lambda f: cv2.imdecode(cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 10])[1], 1)),
    "grey": ("should_refuse", lambda f: np.repeat(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)[..., None], 3, -1)),
    "dark": ("should_refuse", lambda f: (f * 0.25).astype(np.uint8)),
    "bright": ("should_refuse", lambda f: np.clip(f * 1.0 + 90, 0, 255).astype(np.uint8)),
    "stylised": ("other_style", lambda f: cv2.stylization(f, sigma_s=60, sigma_r=0.45)),
    "edge-preserving": ("other_style", lambda f: cv2.edgePreservingFilter(f, flags=1, sigma_s=100, sigma_r=0.6)),
    "pencil": ("other_style", lambda f: cv2.pencilSketch(f, sigma_s=60, sigma_r=0.07, shade_factor=0.05)[1]),
    "cartoon filter": ("other_style", cartoon_filter),
}


def synthetic_crops() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    emoji = []
    for i in range(SAMPLE):
        image = np.full((SIZE, SIZE, 3), (80 + 5 * i, 140, 200), np.uint8)
        cv2.circle(image, (32, 38), 20, (250, 210, 40), -1, cv2.LINE_AA)
        for x in (24, 40):
            cv2.circle(image, (x, 32), 3, (20, 20, 20), -1, cv2.LINE_AA)
        cv2.ellipse(image, (32, 44), (9, 5 + i % 3), 0, 0, 180, (20, 20, 20), 2, cv2.LINE_AA)
        emoji.append(image)
    return {
        "black": np.zeros((SAMPLE, SIZE, SIZE, 3), np.uint8),
        "grey": np.full((SAMPLE, SIZE, SIZE, 3), 128, np.uint8),
        "white": np.full((SAMPLE, SIZE, SIZE, 3), 255, np.uint8),
        "uniform noise": rng.integers(0, 256, (SAMPLE, SIZE, SIZE, 3)).astype(np.uint8),
        "smooth noise": np.stack(
            [cv2.GaussianBlur(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8), (0, 0), 3) for _ in range(SAMPLE)]
        ),
        "emoji": np.stack(emoji),
    }


def summarise(faces: list[dict], cost: dict, threshold: float, model: str, check: str, seconds: float) -> dict:
    """The results JSON from the per-face rows and the cost: what a run writes, and what
    ``--from-json`` derives again from a stored run's rows without any model work."""

    def scores(kinds) -> list[float]:
        return [f["median"] for f in faces if f["kind"] in kinds]

    must_pass = scores({"must_pass"})
    real_rows = [f for f in faces if f["kind"] in ("must_refuse", "should_refuse") and f["group"] != "synthetic crops"]
    real_faces = [f["median"] for f in real_rows]
    wrong = [
        f
        for f in faces
        if (f["kind"] == "must_pass" and not f["passed"]) or (f["kind"] == "must_refuse" and f["passed"])
    ]
    soft = [f for f in faces if f["kind"] in ("should_refuse", "other_style") and f["passed"]]
    groups: dict[str, list[dict]] = {}
    for f in faces:
        groups.setdefault(f["group"], []).append(f)
    table = []
    for group, rows in groups.items():
        med = [r["median"] for r in rows]
        table.append(
            {
                "group": group,
                "kind": rows[0]["kind"],
                "faces": len(rows),
                "min_of_medians": round(min(med), 2),
                "max_of_medians": round(max(med), 2),
                "lowest_crop": round(min(r["min"] for r in rows), 2),
                "passed": sum(r["passed"] for r in rows),
                "check_seconds_mean": round(float(np.mean([r["check_seconds"] for r in rows])), 4),
            }
        )
    results = {
        "model": model,
        "check": check,
        "threshold": threshold,
        "sample": SAMPLE,
        "in_domain_min": round(min(must_pass), 3),
        "out_of_domain_max": round(max(real_faces), 3) if real_faces else None,
        "shared_clips_max": max((f["median"] for f in faces if f["group"] == "real clip"), default=None),
        "photos_max": max((f["median"] for f in faces if f["group"] == "real photo"), default=None),
        "lowest_in_domain": _name(min((f for f in faces if f["kind"] == "must_pass"), key=lambda f: f["median"])),
        "highest_real": _name(max(real_rows, key=lambda f: f["median"])) if real_rows else None,
        "other_style_max": round(max(scores({"other_style"})), 3) if scores({"other_style"}) else None,
        "margin_in_domain": round(min(must_pass) - threshold, 3),
        "margin_real": round(threshold - max(real_faces), 3) if real_faces else None,
        "wrong": [f"{f['clip']} face {f['face']}: {f['median']}" for f in wrong],
        "soft_passes": [f"{f['clip']} face {f['face']}: {f['median']}" for f in soft],
        "cost": cost,
        "groups": table,
        "faces": faces,
        "seconds": seconds,
    }

    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "domain_check.json")
    parser.add_argument("--model", type=Path, default=SHIPPED_MODELS)
    parser.add_argument("--threshold", type=float, default=None, help="default: the model card's")
    parser.add_argument("--people", type=int, default=20, help="held-out people of the quality benchmark")
    parser.add_argument("--edits", type=int, default=2, help="people whose clip the tool edits (4 edits each)")
    parser.add_argument("--scenes", type=int, default=6, help="scene clips per frame size")
    parser.add_argument("--real-clips", type=Path, default=ROOT.parent / "shared" / "data" / "clips")
    parser.add_argument("--photos", type=Path, nargs="*", default=[], help="still photos of real faces")
    parser.add_argument("--write-card", action="store_true", help="write the card with the measured margins")
    parser.add_argument("--from-json", type=Path, help="derive the results again from a stored run's per-face rows")
    args = parser.parse_args()
    if args.from_json:
        stored = json.loads(args.from_json.read_text())
        results = summarise(
            stored["faces"], stored["cost"], stored["threshold"], stored["model"], stored["check"], stored["seconds"]
        )
        write_json(args.json, results)
        print(f"written: {args.json} (from the rows of {args.from_json})")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))

    card = ModelCard.read(args.model)
    threshold = args.threshold if args.threshold is not None else card.threshold if card else None
    if threshold is None:
        parser.error(f"{args.model} has no {MODEL_CARD}: give --threshold")
    base = card or ModelCard("faceworld", "FaceWorld's drawn faces", "vae_round_trip", threshold, "…")
    card_now = dataclasses.replace(base, threshold=threshold)
    pipe = load_pipeline(str(args.model), device="cpu")
    vae = pipe.vae
    work = Path(tempfile.mkdtemp(prefix="domain-check-"))
    faces: list[dict] = []  # one row per face

    def add(group: str, clip: str, kind: str, crops: list[np.ndarray]) -> None:
        for index, stack in enumerate(crops):
            started = time.perf_counter()
            result = check_track(card_now, vae, stack, label=f"face {index} of {clip}")
            seconds = time.perf_counter() - started
            # the score's two parts, for the table (the same sampled crops as the check)
            vae_psnr, resample_psnr = vae_round_trip_parts(vae, stack[sample_indices(len(stack))])
            shortfall = np.maximum(0, resample_psnr - vae_psnr)
            faces.append(
                {
                    "group": group,
                    "clip": clip,
                    "face": index,
                    "kind": kind,
                    "crops": len(stack),
                    "median": round(result.score, 3),
                    "min": round(min(result.scores), 3),
                    "vae_psnr_median": round(float(np.median(vae_psnr)), 3),
                    "shortfall_median": round(float(np.median(shortfall)), 3),
                    "passed": result.passed,
                    "check_seconds": round(seconds, 4),
                }
            )

    def codec(clip, name: str) -> np.ndarray:
        return read_frames(write_video(work / f"{name}.mp4", iter(clip), clip.fps))

    started = time.perf_counter()
    # --- must pass: the quality benchmark's held-out clips, as they are and with each edit applied
    people = list(HELD_OUT_IDS)[: args.people]
    for person in people:
        clip = render_clip(person, seed=person, frames=12, size=128, fps=12.0)
        add("held-out clip", f"person {person}", "must_pass", track_crops(codec(clip, "c"), clip.tracks))
        for edit in EDITS.values():
            if not edit.is_noop(clip.attributes[0]):
                edited = clip.with_edit(edit)
                add(
                    f"held-out clip, {edit.name} applied",
                    f"person {person} + {edit.name}",
                    "must_pass",
                    track_crops(codec(edited, "c"), edited.tracks),
                )
    # --- must pass: scene clips, one or two moving faces, random attributes, several frame sizes
    rng = np.random.default_rng(11)
    pool = list(HELD_OUT_IDS)[400:2000]
    for size in (128, 192, 256, 384, 512):
        for s in range(args.scenes):
            who = [int(x) for x in rng.choice(pool, 1 + s % 2, replace=False)]
            clip = render_clip(who, [random_attributes(rng) for _ in who], seed=1000 * size + s, frames=16, size=size)
            add(
                f"scene {size}²",
                f"scene {size}² #{s} ({len(who)} faces)",
                "must_pass",
                track_crops(codec(clip, "s"), clip.tracks),
            )
    for s in range(2):
        who = [int(x) for x in rng.choice(pool, 2, replace=False)]
        clip = render_clip(who, [random_attributes(rng) for _ in who], seed=77 + s, frames=16, size=(384, 216))
        add("scene 384x216", f"scene 384x216 #{s}", "must_pass", track_crops(codec(clip, "w"), clip.tracks))
    clip = render_clip([3, 14], seed=1, frames=24, size=256)  # what `ipfacediff faceworld render clip` makes
    add("faceworld render clip", "render clip default", "must_pass", track_crops(codec(clip, "d"), clip.tracks))
    print(f"FaceWorld renders scored: {time.perf_counter() - started:.0f} s", flush=True)

    # --- must pass: the tool's own edits (and the edit's seconds)
    edits_timed = []
    for person in people[: args.edits]:
        clip = render_clip(person, seed=person, frames=12, size=128, fps=12.0)
        source = write_video(work / f"{person}.mp4", iter(clip), clip.fps)
        tracks_path = clip.tracks.save(work / f"{person}.tracks.json")
        cache = InversionCache(work / f"cache-{person}")  # the first edit inverts, the others reuse it
        for number, edit in enumerate(e for e in EDITS.values() if not e.is_noop(clip.attributes[0])):
            out = work / f"{person}-{edit.name}.mp4"
            settings = EditSettings(
                prompt=edit.target_caption(clip.attributes[0]),
                source_prompt=caption(clip.attributes[0]),
                steps=20,
                adapters=edit.name,
                hair=edit.name == "blonde_hair",
            )
            wall, cpu = _timed(
                lambda: edit_video(
                    source, out, settings, pipeline=pipe, tracks_path=tracks_path, cache=cache, log=lambda _m: None
                )
            )
            # the check of the same clip's track, timed right after the edit (the machine may be shared)
            crops = track_crops(read_frames(source), clip.tracks)[0]
            check_wall, check_cpu = min(_timed(lambda: check_track(card_now, vae, crops, label="x")) for _ in range(3))
            edits_timed.append(
                {
                    "person": person,
                    "edit": edit.name,
                    "inversion": "computed" if number == 0 else "from the cache",
                    "seconds": round(wall, 3),
                    "cpu_seconds": round(cpu, 3),
                    "check_seconds": round(check_wall, 4),
                    "check_cpu_seconds": round(check_cpu, 4),
                    "crops": len(crops),
                }
            )
            add(
                "tool's own edit",
                f"person {person} edited: {edit.name}",
                "must_pass",
                track_crops(read_frames(out), clip.tracks),
            )
    print(f"edits done: {time.perf_counter() - started:.0f} s", flush=True)

    # --- must refuse: the shared real clips, faces found as `ipfacediff edit` finds them
    real = [args.real_clips / n for n in ("closeup.mp4", "jogger.mp4")]
    if not all(p.is_file() for p in real):
        print(f"real clips not found in {args.real_clips}: skipped", flush=True)
        real = []
    for path in real:
        info = probe_video(path)
        found = face_crops(path, info, SIZE)
        add(
            "real clip",
            path.name,
            "must_refuse",
            [np.stack([found.crops[t.id][f] for f in sorted(found.crops[t.id])]) for t in found.tracks.tracks],
        )
        frames = read_frames(path)
        for name, (kind, change) in REAL_VARIANTS.items():
            changed = np.stack([change(f) for f in frames])
            factor = changed.shape[1] / frames.shape[1]
            tracks = found.tracks if factor == 1 else scaled(found.tracks, factor)
            add(
                f"real clip {name}" if kind != "other_style" else f"other style: {name}",
                f"{path.name} {name}",
                kind,
                track_crops(changed, tracks),
            )
    for photo in args.photos:
        image = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        big = cv2.resize(image, (w + 24, h + 24))
        video = write_video(
            work / f"{photo.stem}.mp4", iter([big[2 * i : 2 * i + h, i : i + w] for i in range(12)]), 12.0
        )
        found = face_crops(video, probe_video(video), SIZE)
        add(
            "real photo",
            photo.name,
            "must_refuse",
            [np.stack([found.crops[t.id][f] for f in sorted(found.crops[t.id])]) for t in found.tracks.tracks],
        )
    for name, crops in synthetic_crops().items():
        add("synthetic crops", name, "should_refuse", [crops])

    # --- the cost: the check of one track against an edit of the same clip (12 frames: 12 crops)
    crops16 = track_crops(
        codec(render_clip(people[0], seed=people[0], frames=16, size=128), "t"),
        render_clip(people[0], seed=people[0], frames=16, size=128).tracks,
    )[0]
    check16 = min(_timed(lambda: check_track(card_now, vae, crops16, label="x")) for _ in range(3))
    cost = {
        "check_seconds_16_crops": round(check16[0], 4),
        "check_cpu_seconds_16_crops": round(check16[1], 4),
        "edits": edits_timed,
        "torch_threads": torch.get_num_threads(),
    }
    for name, pick in (
        ("with_inversion", lambda e: e["inversion"] == "computed"),
        ("cached_inversion", lambda e: e["inversion"] != "computed"),
    ):
        rows = [e for e in edits_timed if pick(e)]
        if rows:
            cost[f"edit_seconds_{name}"] = round(float(np.median([e["seconds"] for e in rows])), 3)
            cost[f"check_share_of_edit_{name}"] = round(
                float(np.median([e["check_seconds"] / e["seconds"] for e in rows])), 4
            )
            cost[f"check_cpu_share_of_edit_{name}"] = round(
                float(np.median([e["check_cpu_seconds"] / e["cpu_seconds"] for e in rows])), 4
            )
    if edits_timed:
        cost["check_seconds_12_crops"] = round(float(np.median([e["check_seconds"] for e in edits_timed])), 4)

    results = summarise(
        faces, cost, threshold, _shown(Path(args.model)), card_now.check, round(time.perf_counter() - started, 1)
    )
    table, wrong = results["groups"], results["wrong"]
    print(f"\n{'group':38s} {'kind':13s} faces  median min..max   lowest crop  passed  check s")
    for row in table:
        print(
            f"{row['group']:38s} {row['kind']:13s} {row['faces']:5d}  {row['min_of_medians']:6.1f}..{row['max_of_medians']:5.1f}"
            f"  {row['lowest_crop']:10.1f}  {row['passed']:3d}/{row['faces']:<3d} {row['check_seconds_mean']:7.3f}"
        )
    print(
        f"\nthreshold {threshold:g} dB: lowest must-pass median {results['in_domain_min']:.2f} "
        f"(margin {results['margin_in_domain']:+.2f}), highest real-face median {results['out_of_domain_max']} "
        f"(margin {results['margin_real']}), shared clips at most {results['shared_clips_max']}, "
        f"photos at most {results['photos_max']}"
    )
    if "edit_seconds_cached_inversion" in cost:
        print(
            f"cost: check of one track {cost['check_seconds_12_crops']:.3f} s (12 crops), {check16[0]:.3f} s (16 crops); "
            f"edit of that 12-frame clip at 20 steps {cost['edit_seconds_with_inversion']:.2f} s with its inversion, "
            f"{cost['edit_seconds_cached_inversion']:.2f} s from the cache: the check is "
            f"{100 * cost['check_share_of_edit_cached_inversion']:.1f} % of the cheaper edit "
            f"({100 * cost['check_cpu_share_of_edit_cached_inversion']:.1f} % in CPU time)"
        )
    print("wrong verdicts: " + ("; ".join(results["wrong"]) or "none"))
    print("passed but better refused: " + ("; ".join(results["soft_passes"]) or "none"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, results)
        print(f"written: {args.json}")
    if args.write_card:
        measured = {
            "by": "benchmarks/domain_check.py",
            "in_domain": "held-out FaceWorld clips (as they are, each edit "
            "applied, the tool's own edits), scene clips 128-512 px with one or two faces",
            "out_of_domain": "the shared real clips closeup.mp4 and jogger.mp4 and their shrunk, blurred, "
            "JPEG, grey, dark and bright versions" + (", real photos" if args.photos else ""),
            "lowest_in_domain": results["lowest_in_domain"],
            "highest_real": results["highest_real"],
            "shared_clips_max": results["shared_clips_max"],
            "other_style_max": results["other_style_max"],
            "check_share_of_edit": cost.get("check_share_of_edit_cached_inversion"),
        }
        new = dataclasses.replace(
            card_now,
            in_domain_min=results["in_domain_min"],
            out_of_domain_max=results["out_of_domain_max"],
            measured=measured,
        )
        print(f"written: {new.write(args.model)}")
    if wrong:
        sys.exit(1)


def _name(face: dict) -> str:
    return f"{face['clip']} face {face['face']}"


def _timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
