"""Does an edit paint over what is in front of the face? FaceWorld occluders and real clips with one composited in.

    python benchmarks/occlusion.py --json OUT.json [--identities 2] [--frames 12] [--steps 8]
        [--occluders hand,microphone,cup,object] [--edits eyeglasses,smile] [--occlusion off|on|both]
        [--real-clips closeup] [--real-frames 12] [--real-occluders hand,object] [--model DIR] [--oracles DIR]
        [--set NAME=VALUE ...]

FaceWorld: each held-out person's clip is rendered with one occluder in front of the face
(``faceworld render clip --occluder``: a hand passing across the eyes, a microphone at the mouth, a
cup raised to the mouth, a board passing across the whole face) and edited on its ground-truth
tracks as benchmarks/faceworld_quality.py does (prompt: the edited caption; that edit's ε2 adapter).
Inside the occluder's true mask (pixels it covers fully, so the face does not show through) the
right output is the input itself, so per setting of ``--occlusion`` it reports
- occluder_change: mean |output − input| there, 0–255 (mean of the channels);
- occluder_changed_share: the share of those pixels changed by more than 8/255 in some channel;
- attribute_success, judged on the frames where the attribute can be seen: the occluder's true
  mask covers at most VISIBLE of the edit's own region there (``Clip.edit_mask``); an attribute
  behind a hand is seen by the oracle in no output, so judging those frames measures the occluder,
  not the edit. Next to it: the same clips and edits unoccluded judged on the same frames
  (``unoccluded_same_frames``), the truth (the true edit with the occluder on top) on them
  (``truth_success``: what a perfect edit scores), and the old figure on every frame
  (``attribute_success_all_frames``). An edit with no such frame is left out (``judged_edits``);
  the ground truth chooses the frames only, the method never sees it;
- id_sim_to_truth (FaceWorld's identity net, every frame, on the ground-truth-aligned crops, as
  faceworld_quality), against the truth behind the occluder;
- seconds per edit, and the cost of ``--occlusion``: the masks' seconds (the run report's
  "occlusion" stage) as a share of the edits' seconds with it on (which reuse the inversion of the
  same clip's edit without it), of those edits without it (run first: the inversion is theirs),
  and per frame.

Real clips (../shared/data/clips; left out, saying so, when absent): the first frames of each, with
a FaceWorld hand or board composited across the eyes and mouth (placed by the unoccluded clip's own
face track), edited through detection (the tracker sees the occluder) with the embedded FaceWorld
model forced onto the real face (``allow_out_of_domain``): the edit itself is nonsense there (the
model knows cartoon faces only), but what is measured is whether the occluder's pixels change, and
that is the paste-back's doing whatever the model paints. The same two figures against the
composite's own mask, the number of face tracks found and the frames edited.

``--occlusion on`` needs the ``occlusion`` setting of EditSettings (issue #36's mask at paste-back);
on a checkout without it only ``off`` runs (today's figure) and ``on``/``both`` stop with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from faceworld_quality import HAIR_EDITS, crops_of  # noqa: E402

from faceworld import EDITS, HELD_OUT_IDS, OCCLUDER_KINDS, caption, occlude_frames, render_clip  # noqa: E402
from faceworld.oracles import ATTRIBUTE_NAMES, AttributeOracle, FaceWorldIdentity  # noqa: E402
from ipfacediff.diffusion import InversionCache  # noqa: E402
from ipfacediff.face import _invert, alignment_transforms, track_faces  # noqa: E402
from ipfacediff.job import SHIPPED_MODELS, edit_video, load_pipeline  # noqa: E402
from ipfacediff.settings import EditSettings  # noqa: E402
from ipfacediff.video import read_frames, write_video  # noqa: E402

CHANGED = 8  # levels of 0-255: a change a viewer can see on a flat object
SOLID = 0.99  # coverage above which a pixel is the occluder alone
VISIBLE = 1 / 3  # the most of an edit's region an occluder may cover in a frame its success is judged on
REAL_PROMPT = "a face with eyeglasses"
# (mask seconds, edit seconds, frames) of each edit with --occlusion.
MASK_SECONDS: list[tuple[float, float, int]] = []
SHARED_CLIPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clips"


def has_occlusion_setting() -> bool:
    return any(f.name == "occlusion" for f in fields(EditSettings))


def occluder_figures(output: np.ndarray, source: np.ndarray, coverage: np.ndarray) -> dict:
    """Change of the occluder's own pixels: mean |Δ| (0-255) and the share changed by more than CHANGED."""
    solid = coverage >= SOLID
    if not solid.any():
        return {"occluder_change": 0.0, "occluder_changed_share": 0.0, "occluder_pixels": 0}
    diff = np.abs(output.astype(np.int16) - source.astype(np.int16))[solid]
    return {
        "occluder_change": round(float(diff.mean()), 3),
        "occluder_changed_share": round(float((diff.max(axis=-1) > CHANGED).mean()), 4),
        "occluder_pixels": int(solid.sum()),
    }


def pooled(rows: list[dict]) -> dict:
    """Occluder figures over several edits, weighted by each one's occluder pixels."""
    n = sum(r["occluder_pixels"] for r in rows)
    mean = lambda key: sum(r[key] * r["occluder_pixels"] for r in rows) / n if n else 0.0  # noqa: E731
    return {
        "occluder_change": round(mean("occluder_change"), 3),
        "occluder_changed_share": round(mean("occluder_changed_share"), 4),
        "occluder_pixels": n,
    }


class Oracles:
    """FaceWorld's attribute oracle and identity net, scored as benchmarks/faceworld_quality.py does."""

    def __init__(self, folder: Path) -> None:
        self.identity = FaceWorldIdentity.from_pretrained(folder / "identity")
        self.attributes = AttributeOracle.from_pretrained(folder / "attributes")

    def calls(self, crops: np.ndarray) -> dict:
        return {k: v.mean() > 0.5 for k, v in self.attributes.predict_proba(crops).items()}

    def probabilities(self, crops: np.ndarray, target: str) -> tuple[float, list[float], dict]:
        """From one pass of the oracle over ``crops``: its mean probability of ``target`` (how near
        the call is to flipping), that probability by frame, and every attribute's call."""
        proba = self.attributes.predict_proba(crops)
        by_frame = [round(float(p), 2) for p in proba[target]]
        return round(float(proba[target].mean()), 3), by_frame, {k: v.mean() > 0.5 for k, v in proba.items()}

    def success(self, crops: np.ndarray, target: str, source_calls: dict) -> float:
        """1.0 where the oracle calls the target attribute over ``crops`` and every other one as
        over the source's same frames (``source_calls``)."""
        calls = self.calls(crops)
        return float(calls[target] and all(calls[a] == source_calls[a] for a in ATTRIBUTE_NAMES if a != target))

    @torch.no_grad()
    def score(self, crops: np.ndarray, truth_crops: np.ndarray, target: str, source_calls: dict) -> dict:
        calls = self.calls(crops)
        kept = all(calls[a] == source_calls[a] for a in ATTRIBUTE_NAMES if a != target)

        def embed(x: np.ndarray) -> torch.Tensor:
            return self.identity(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1)

        sim = float(self.identity.similarity(embed(crops), embed(truth_crops)).mean())
        return {"success": float(calls[target] and kept), "id": sim}


def run_edit(source: Path, out: Path, settings: EditSettings, pipe, tracks: Path | None, cache) -> float:
    """Seconds of the edit; the masks' own seconds (the run report's "occlusion" stage) go to MASK_SECONDS."""
    started = time.perf_counter()
    report = edit_video(source, out, settings, pipeline=pipe, tracks_path=tracks, cache=cache, log=lambda _m: None)
    took = time.perf_counter() - started
    if "occlusion" in report.seconds:
        MASK_SECONDS.append((report.seconds["occlusion"], took, len(read_frames(source))))
    return took


def faceworld_rows(args, pipe, oracles: Oracles, settings_on: list[bool], work: Path, cache) -> dict:
    has_library = bool(pipe.adapter_library and pipe.adapter_library.edits)
    rows: dict = {kind: {s: [] for s in ("off", "on")} for kind in args.occluders}
    scores: dict = {"unoccluded": {"success": [], "id": []}}
    scores |= {f"{kind}/{s}": {"success": [], "id": []} for kind in args.occluders for s in ("off", "on")}
    # Success on the frames where the attribute can be seen: by occluder and setting, then the same
    # frames of the unoccluded clip's edit and of the truth; and how many frames were judged.
    judged: dict = {kind: {s: [] for s in ("off", "on", "unoccluded", "truth", "frames")} for kind in args.occluders}
    per_edit: list[dict] = []  # each occluded edit's judged success, to find the ones that fail
    seconds: dict = {"off": [], "on": []}
    for person in list(HELD_OUT_IDS)[: args.identities]:
        plain = render_clip(person, seed=person, frames=args.frames, size=128, fps=12.0)
        tracks = plain.tracks.save(work / f"{person}.tracks.json")  # the face is there whatever covers it
        for edit in args.edits:
            if edit.is_noop(plain.attributes[0]):
                continue
            common = {
                "prompt": edit.target_caption(plain.attributes[0]),
                "source_prompt": caption(plain.attributes[0]),
                "steps": args.steps,
                "hair": edit.name in HAIR_EDITS,
                "adapters": edit.name if has_library else "none",
            } | args.settings
            plain_crops = plain_source = None  # the unoccluded clip's edit and source, aligned
            for kind in [None, *args.occluders]:
                clip = plain.with_occluders([kind] if kind else [])
                source = write_video(work / f"{person}-{kind}.mp4", iter(clip), clip.fps)
                source_frames = read_frames(source)
                source_crops = crops_of(source_frames, clip.tracks)
                truth = clip.with_edit(edit)
                truth_crops = crops_of(truth.array(), truth.tracks)
                source_calls = oracles.calls(source_crops)
                coverage = np.stack([clip.occluder_mask(i) for i in range(clip.frames)])
                seen = visible_frames(clip, edit, coverage) if kind else []
                if kind and seen:
                    seen_calls = oracles.calls(source_crops[seen])
                    judged[kind]["truth"].append(oracles.success(truth_crops[seen], edit.name, seen_calls))
                    plain_calls = oracles.calls(plain_source[seen])
                    judged[kind]["unoccluded"].append(oracles.success(plain_crops[seen], edit.name, plain_calls))
                    judged[kind]["frames"].append(len(seen))
                for on in settings_on if kind else [False]:
                    setting = "on" if on else "off"
                    extra = {"occlusion": on} if has_occlusion_setting() else {}
                    out = work / f"{person}-{edit.name}-{kind}-{setting}.mp4"
                    took = run_edit(source, out, EditSettings(**common, **extra), pipe, tracks, cache)
                    frames = read_frames(out)
                    crops = crops_of(frames, clip.tracks)
                    score = oracles.score(crops, truth_crops, edit.name, source_calls)
                    key = f"{kind}/{setting}" if kind else "unoccluded"
                    for k in ("success", "id"):
                        scores[key][k].append(score[k])
                    if not kind:
                        plain_crops, plain_source = crops, source_crops
                    else:
                        rows[kind][setting].append(occluder_figures(frames, source_frames, coverage))
                        seconds[setting].append(took)
                        if seen:
                            judged[kind][setting].append(oracles.success(crops[seen], edit.name, seen_calls))
                            found = {
                                name: oracles.probabilities(c[seen], edit.name)
                                for name, c in (("output", crops), ("unoccluded", plain_crops), ("truth", truth_crops))
                            }
                            per_edit.append({
                                "person": person, "edit": edit.name, "occluder": kind, "setting": setting,
                                "success": judged[kind][setting][-1], "unoccluded": judged[kind]["unoccluded"][-1],
                                "target_probability": found["output"][0],
                                "unoccluded_probability": found["unoccluded"][0],
                                "truth_probability": found["truth"][0],
                                "by_frame": {name: by_frame for name, (_, by_frame, _) in found.items()},
                                "also_changed": [a for a, c in found["output"][2].items()
                                                 if a != edit.name and c != seen_calls[a]],
                                "seen_frames": seen,
                            })  # fmt: skip
        print(f"identity {person}: done", flush=True)
    summary = {key: {"attribute_success": round(float(np.mean(v["success"])), 4),
                     "id_sim_to_truth": round(float(np.mean(v["id"])), 4), "edits": len(v["id"])}
               for key, v in scores.items() if v["id"]}  # fmt: skip
    table = {}
    for kind, by in rows.items():
        table[kind] = {}
        for s, r in by.items():
            if not r:
                continue
            row = pooled(r) | summary[f"{kind}/{s}"]
            row["attribute_success_all_frames"] = row.pop("attribute_success")
            table[kind][s] = row | judged_success(judged[kind], s)
    return {"occluders": table, "unoccluded": summary["unoccluded"], "per_edit": per_edit, "seconds": seconds}


def judged_success(judged: dict, setting: str) -> dict:
    """Success on the frames where the attribute can be seen (see the module's docstring)."""
    mean = lambda key: round(float(np.mean(judged[key])), 4) if judged[key] else None  # noqa: E731
    return {
        "attribute_success": mean(setting),
        "unoccluded_same_frames": mean("unoccluded"),
        "truth_success": mean("truth"),
        "judged_edits": len(judged[setting]),
        "judged_frames_per_edit": mean("frames"),
    }


def visible_frames(clip, edit, coverage: np.ndarray) -> list[int]:
    """The frames where the occluder's true mask covers at most VISIBLE of the edit's region."""
    seen = []
    for i in range(clip.frames):
        region = clip.edit_mask(edit, i, 0)
        if region.any() and float(coverage[i][region].mean()) <= VISIBLE:
            seen.append(i)
    return seen


def real_rows(args, pipe, settings_on: list[bool], work: Path, cache) -> dict:
    from ipfacediff.video import iter_frames

    results: dict = {}
    for name in args.real_clips:
        path = SHARED_CLIPS / f"{name}.mp4"
        if not path.is_file():
            print(f"real clip {name}: left out ({path} is absent: the shared data is not mounted here)")
            results[name] = {"skipped": f"{path} is absent"}
            continue
        frames = np.stack([f for _, f in zip(range(args.real_frames), iter_frames(path))])
        found = track_faces(iter(frames), fps=10.0)
        if not found.tracks:
            results[name] = {"skipped": "no face found in the unoccluded clip"}
            continue
        face = max(found.tracks, key=lambda t: t.median_area)
        to_frame = {f: _invert(M) for f, M in alignment_transforms(face, 1).items()}
        results[name] = {}
        for kind in args.real_occluders:
            composite, coverage = occlude_frames(frames, to_frame, [kind])
            source = write_video(work / f"real-{name}-{kind}.mp4", iter(composite), 10.0)
            source_frames = read_frames(source)
            results[name][kind] = {}
            tracks = track_faces(iter(source_frames), fps=10.0)  # what the edit's own detection finds
            fully = [i for i in range(len(frames)) if i in to_frame and covered_share(face, i, coverage) > 0.95]
            for on in settings_on:
                setting = "on" if on else "off"
                extra = {"occlusion": on} if has_occlusion_setting() else {}
                settings = EditSettings(prompt=REAL_PROMPT, steps=args.steps, allow_out_of_domain=True, **extra)
                out = work / f"real-{name}-{kind}-{setting}.mp4"
                took = run_edit(source, out, settings, pipe, None, cache)
                results[name][kind][setting] = occluder_figures(read_frames(out), source_frames, coverage) | {
                    "tracks": len(tracks.tracks),
                    "frames_tracked": sorted({f for t in tracks.tracks for f in t.frames}),
                    "frames_fully_covered": fully,
                    "seconds": round(took, 2),
                }
        print(f"real clip {name}: done", flush=True)
    return results


def covered_share(track, frame: int, coverage: np.ndarray) -> float:
    """The share of the track's face box (its five points' box) the composite covers."""
    x0, y0, x1, y1 = (int(round(v)) for v in track.boxes[track.position(frame)])
    box = coverage[frame, max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]
    return float(box.mean()) if box.size else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--identities", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--occluders", default=",".join(OCCLUDER_KINDS))
    parser.add_argument("--edits", default="eyeglasses,smile", help="comma-separated subset of " + ", ".join(EDITS))
    parser.add_argument("--occlusion", choices=("off", "on", "both"), default=None, help="default: both where known")
    parser.add_argument("--real-clips", default="closeup", help="names under ../shared/data/clips ('' for none)")
    parser.add_argument("--real-frames", type=int, default=12)
    parser.add_argument("--real-occluders", default="hand,object")
    parser.add_argument("--model", default=None, help="default: the shipped FaceWorld models")
    parser.add_argument("--oracles", type=Path, default=SHIPPED_MODELS / "oracles")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="an EditSettings field for every FaceWorld edit, occluded and not (an ablation), e.g. keyframes=4",
    )  # fmt: skip
    args = parser.parse_args()
    args.settings, names = {}, {f.name for f in fields(EditSettings)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in names:
            parser.error(f"--set {item}: EditSettings has no field {name!r}")
        try:  # numbers, true/false, null; anything else is a string (a prompt)
            args.settings[name] = json.loads(value)
        except json.JSONDecodeError:
            args.settings[name] = value
    known = has_occlusion_setting()
    choice = args.occlusion or ("both" if known else "off")
    if choice != "off" and not known:
        print(f"error: --occlusion {choice}: this checkout's EditSettings has no occlusion setting", file=sys.stderr)
        sys.exit(2)
    settings_on = {"off": [False], "on": [True], "both": [False, True]}[choice]
    args.occluders = [k for k in args.occluders.split(",") if k]
    args.real_occluders = [k for k in args.real_occluders.split(",") if k]
    args.real_clips = [k for k in args.real_clips.split(",") if k]
    args.edits = [EDITS[e] for e in args.edits.split(",")]
    if not known:
        print("EditSettings has no occlusion setting here: every edit runs as today (--no-occlusion)")

    pipe = load_pipeline(args.model, device=args.device)
    work = Path(tempfile.mkdtemp(prefix="occlusion-"))
    cache = InversionCache(work / "cache")
    world = faceworld_rows(args, pipe, Oracles(args.oracles), settings_on, work, cache)
    world_masks = sum(m for m, _, _ in MASK_SECONDS)  # the FaceWorld edits' (the real clips' follow)
    real = real_rows(args, pipe, settings_on, work, cache)
    off, on = world.pop("seconds").values()
    results = {
        "identities": list(HELD_OUT_IDS)[: args.identities],
        "frames": args.frames,
        "steps": args.steps,
        "edits": [e.name for e in args.edits],
        "occlusion_setting_known": known,
        "model": args.model or "embedded FaceWorld default",
        "settings": args.settings,
        "real_model_note": "embedded FaceWorld model forced onto real faces (allow_out_of_domain): the edit is "
        "nonsense there; only the occluder-pixel figures are meant",
        "success_judged_on": f"frames where the occluder's true mask covers at most {VISIBLE:.3f} of the edit's "
        "region, for the occluded, the unoccluded (unoccluded_same_frames) and the truth (truth_success) alike; "
        "attribute_success_all_frames: every frame, as before",
        "faceworld": world,
        "real": real,
        "seconds_per_edit": {"off": round(float(np.mean(off)), 3)}
        | ({"on": round(float(np.mean(on)), 3)} if on else {}),
        # What the masks take of an edit with --occlusion (its run report's "occlusion" stage): on
        # against off times other clips and a warm inversion cache, so it is no measure of the cost.
        "occlusion_cost_share": round(sum(m for m, _, _ in MASK_SECONDS) / sum(t for _, t, _ in MASK_SECONDS), 4)
        if MASK_SECONDS
        else None,
        "mask_seconds_per_frame": round(sum(m for m, _, _ in MASK_SECONDS) / sum(n for _, _, n in MASK_SECONDS), 4)
        if MASK_SECONDS
        else None,
        # The same masks' seconds over the FaceWorld edits without --occlusion, which run first on
        # each clip (the inversion is done there, as in a clip's first edit).
        "occlusion_cost_share_of_off_edits": round(world_masks / sum(off), 4) if MASK_SECONDS and off else None,
    }
    print(
        f"{'faceworld':<24}{'setting':>8}{'occl Δ':>9}{'>8/255':>9}{'success':>9}{'unoccl':>8}{'truth':>7}"
        f"{'all fr':>8}{'id sim':>8}{'edits':>7}"
    )
    number = lambda v, w: f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for kind, by in world["occluders"].items():
        for setting, row in by.items():
            print(
                f"{kind:<24}{setting:>8}{row['occluder_change']:>9.2f}{row['occluder_changed_share']:>9.3f}"
                f"{number(row['attribute_success'], 9)}{number(row['unoccluded_same_frames'], 8)}"
                f"{number(row['truth_success'], 7)}{row['attribute_success_all_frames']:>8.3f}"
                f"{row['id_sim_to_truth']:>8.3f}{row['edits']:>7}"
            )
    u = world["unoccluded"]
    print(
        f"{'(same clips unoccluded)':<24}{'':>8}{'':>9}{'':>9}{'':>9}{'':>8}{'':>7}{u['attribute_success']:>8.3f}"
        f"{u['id_sim_to_truth']:>8.3f}{u['edits']:>7}"
    )
    print(f"{'real clip':<24}{'setting':>8}{'occl Δ':>9}{'>8/255':>9}{'tracks':>9}{'tracked':>8}{'full':>7}")
    for name, by_kind in real.items():
        if "skipped" in by_kind:
            print(f"{name:<24} skipped: {by_kind['skipped']}")
            continue
        for kind, by in by_kind.items():
            for setting, row in by.items():
                print(
                    f"{name + ' + ' + kind:<24}{setting:>8}{row['occluder_change']:>9.2f}"
                    f"{row['occluder_changed_share']:>9.3f}{row['tracks']:>9}{len(row['frames_tracked']):>8}"
                    f"{len(row['frames_fully_covered']):>7}"
                )
    print(
        f"seconds per FaceWorld edit: {results['seconds_per_edit']}; occlusion cost: {results['occlusion_cost_share']}"
        f" of an edit ({results['occlusion_cost_share_of_off_edits']} of one without it run first),"
        f" {results['mask_seconds_per_frame']} s a frame"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
