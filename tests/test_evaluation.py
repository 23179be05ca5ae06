"""Scoring an edit: identity kept, edit made, no added flicker; the JSON and the HTML report.

Real-clip tests cut the first CUT frames of ../shared/data/clips (skipped when absent) and build
the "edits" themselves: the clip itself, the other person's clip, a frame-shuffled copy, a noised
copy and a face swap. Figures are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip(
        "face_recognition_models is not installed: the identity encoder's weights come from it", allow_module_level=True
    )

from ipfacediff.errors import UserError
from ipfacediff.evaluation import (
    ID_SAME_PERSON_COSINE,
    METRIC_KEYS,
    evaluate_videos,
    write_html_report,
    write_metrics_json,
)
from ipfacediff.face import alignment_transforms, crop_face, face_mask, paste_face, track_faces
from ipfacediff.identity import DLIB_SAME_PERSON_THRESHOLD, IdentityEncoder
from ipfacediff.video import read_frames, write_video

from conftest import moving_texture

CUT = 12  # frames of each real clip used here
FPS = 10.0


@pytest.fixture(scope="module")
def encoder() -> IdentityEncoder:
    return IdentityEncoder.from_pretrained(None)


@pytest.fixture(scope="module")
def clips(shared_clip, tmp_path_factory):
    """name -> (path of the cut clip, its frames, its face tracks); each cut and tracked once."""
    folder = tmp_path_factory.mktemp("eval-clips")
    cache = {}

    def get(name: str):
        if name not in cache:
            frames = read_frames(shared_clip(name), count=CUT)
            path = write_video(folder / name, frames, FPS)
            frames = read_frames(path)  # what the evaluation will decode
            cache[name] = path, frames, track_faces(iter(frames), fps=FPS)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def evaluate(clips, encoder):
    """(original clip name, edited path or clip name) -> metrics, computed once per pair."""
    cache = {}

    def run(original: str, edited, **kwargs):
        path, _, tracks = clips(original)
        edited_path = clips(edited)[0] if isinstance(edited, str) else edited
        key = (original, str(edited_path), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = evaluate_videos(path, edited_path, tracks=tracks, identity=encoder, **kwargs)
        return cache[key]

    return run


def show(label: str, m: dict) -> None:
    keys = (
        "id_sim",
        "id_dist",
        "id_drift",
        "tl_id",
        "tg_id",
        "warp_error_ratio",
        "flicker",
        "face_warp_error_ratio",
        "face_flicker",
        "background_psnr",
        "face_detection_rate",
    )
    figures = ", ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys)
    print(f"\n{label}: {figures}, {m['seconds']['total']:.1f} s")


# --- real clips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["closeup.mp4", "jogger.mp4"])
def test_video_against_itself_is_perfect(evaluate, name):
    m = evaluate(name, name)
    show(f"{name} vs itself", m)
    assert m["id_sim"] >= 0.99 and m["id_dist"] < 0.01 and m["id_drift"] < 0.05
    assert m["tl_id"] == pytest.approx(1.0, abs=0.01)
    assert m["tg_id"] == pytest.approx(1.0, abs=0.01)
    assert m["warp_error_ratio"] == pytest.approx(1.0, abs=0.05)
    assert m["face_warp_error_ratio"] == pytest.approx(1.0, abs=0.05)
    assert abs(m["flicker"]) < 0.01 and abs(m["face_flicker"]) < 0.01
    assert m["background_psnr"] >= 60
    assert m["face_detection_rate"] >= 0.9
    assert m["same_person"] is True
    assert m["clip_direction"] is None and m["clip_score"] is None  # no CLIP model given
    # the flow is right: warping explains most of the frame-to-frame change of the input
    assert m["warp_error_original"] < 0.5 * m["temporal_diff_original"]


def test_two_people_are_told_apart(evaluate):
    m = evaluate("closeup.mp4", "jogger.mp4")
    show("closeup vs jogger", m)
    # Threshold: dlib's same-person distance 0.6, i.e. cosine ID_SAME_PERSON_COSINE (0.915).
    assert m["id_dist"] > DLIB_SAME_PERSON_THRESHOLD
    assert m["id_sim"] < ID_SAME_PERSON_COSINE
    assert m["same_person"] is False
    assert m["id_drift"] > 1.0


@pytest.fixture(scope="module")
def corrupted(clips, tmp_path_factory):
    """Frame-shuffled, per-frame noised and face-swapped copies of the cut closeup clip."""
    folder = tmp_path_factory.mktemp("eval-corrupted")
    _, frames, tracks = clips("closeup.mp4")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(frames))
    shuffled = write_video(folder / "shuffled.mp4", frames[order], FPS)
    noise = rng.normal(0.0, 8.0, frames.shape)
    noised = write_video(folder / "noised.mp4", np.clip(frames + noise, 0, 255).astype(np.uint8), FPS)

    _, other_frames, other_tracks = clips("jogger.mp4")
    size = 256
    mine = tracks.tracks[0]
    theirs = other_tracks.tracks[0]
    mine_m, theirs_m = alignment_transforms(mine, size), alignment_transforms(theirs, size)
    swapped = []
    for t, frame in enumerate(frames):
        if t in mine_m and t in theirs_m:
            face = crop_face(other_frames[t], theirs_m[t], size)
            frame = paste_face(frame, face, mine_m[t], face_mask(mine, t, mine_m[t], size))
        swapped.append(frame)
    swap = write_video(folder / "swapped.mp4", swapped, FPS)
    return {"shuffled": shuffled, "noised": noised, "swapped": swap}


@pytest.mark.parametrize("kind", ["shuffled", "noised"])
def test_shuffled_and_noised_copies_flicker(evaluate, corrupted, kind):
    base = evaluate("closeup.mp4", "closeup.mp4")
    m = evaluate("closeup.mp4", corrupted[kind])
    show(f"closeup vs {kind}", m)
    assert m["warp_error_ratio"] > base["warp_error_ratio"] + 0.3
    assert m["face_warp_error_ratio"] > base["face_warp_error_ratio"] + 0.3
    assert m["flicker"] > base["flicker"] + 0.5


def test_face_swap_loses_identity_but_keeps_background(evaluate, corrupted):
    base = evaluate("closeup.mp4", "closeup.mp4")
    m = evaluate("closeup.mp4", corrupted["swapped"])
    show("closeup vs face swap", m)
    assert m["id_sim"] < base["id_sim"] - 0.05
    assert m["id_sim"] < ID_SAME_PERSON_COSINE and m["id_dist"] > DLIB_SAME_PERSON_THRESHOLD
    assert m["same_person"] is False
    # the paste touched the face only: the background is the re-encoded original
    assert m["background_psnr"] > 35


def test_json_and_self_contained_html(evaluate, corrupted, tmp_path):
    edited = corrupted["swapped"]
    run = {"settings": {"prompt": "see https://example.com/x", "steps": 20}, "seconds": {"faces": 1.5, "total": 9.0}}
    run_path = tmp_path / "swapped.run.json"
    run_path.write_text(json.dumps(run))
    m = evaluate("closeup.mp4", edited, run_metadata=str(run_path))
    assert m["seconds"]["edit_seconds"] == run["seconds"] and m["seconds"]["total"] > 0
    assert m["settings"] == run["settings"] and m["prompt"] == run["settings"]["prompt"]

    data = json.loads(write_metrics_json(m, tmp_path / "metrics.json").read_text())
    assert set(METRIC_KEYS) | {"tracks", "frames", "per_frame"} <= set(data)
    assert data["frames"] == CUT
    assert len(data["per_frame"]["id_sim"]) == CUT and len(data["per_frame"]["warp_error"]) == CUT - 1
    [track] = data["tracks"]
    assert {
        "id",
        "frames",
        "id_sim",
        "id_dist",
        "id_drift",
        "tl_id",
        "tg_id",
        "clip_direction",
        "clip_score",
        "warp_error_ratio",
        "flicker",
        "face_detection_rate",
    } <= set(track)
    assert track["id_sim"] == pytest.approx(data["id_sim"])  # one track: overall = that track

    page = write_html_report(m, m["original"], edited, tmp_path / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
    assert len(sources) >= 3 and all(s.startswith("data:") for s in sources)
    assert "url(" not in page and "@import" not in page
    from PIL import Image

    frames = []
    for uri in sources:
        kind, payload = re.fullmatch(r"data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)", uri).groups()
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
        frames.append(getattr(image, "n_frames", 1))
    assert frames[0] > 1  # the animated preview
    assert "id_sim" in page and "steps" in page
    print(f"\nreport: {len(page) / 1e3:.0f} kB, images with {frames} frames")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # optional: the page renders headless
        shot = tmp_path / "shot.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--screenshot={shot}",
                "--window-size=1000,1400",
                (tmp_path / "report.html").as_uri(),
            ],
            timeout=60,
            capture_output=True,
        )
        assert shot.is_file() and Image.open(shot).size == (1000, 1400)


def test_tiny_clip_scores_are_finite(evaluate, corrupted, tiny_dir):
    m = evaluate("closeup.mp4", corrupted["swapped"], clip=str(tiny_dir / "clip"), prompt="a face with glasses")
    assert m["prompt"] == "a face with glasses" and m["source_prompt"] == "a face"
    for value in (m["clip_direction"], m["clip_score"], m["tracks"][0]["clip_direction"], m["clip_score_original"]):
        assert isinstance(value, float) and math.isfinite(value)
    assert -1.0 <= m["clip_direction"] <= 1.0 and -1.0 <= m["clip_score"] <= 1.0


def test_bad_clip_model_is_a_user_error(clips, encoder, tmp_path):
    path, _, tracks = clips("closeup.mp4")
    with pytest.raises(UserError, match="CLIP"):
        evaluate_videos(path, path, tracks=tracks, identity=encoder, clip=str(tmp_path), prompt="a smile")


def test_mismatched_videos_are_user_errors(clips, encoder, tmp_path):
    path, frames, tracks = clips("closeup.mp4")
    shorter = write_video(tmp_path / "short.mp4", frames[: CUT // 2], FPS)
    smaller = write_video(tmp_path / "small.mp4", frames[:, ::2, ::2], FPS)
    with pytest.raises(UserError, match="frames"):
        evaluate_videos(path, shorter, tracks=tracks, identity=encoder)
    with pytest.raises(UserError, match="256x256"):
        evaluate_videos(path, smaller, tracks=tracks, identity=encoder)
    with pytest.raises(UserError, match="run metadata"):
        evaluate_videos(path, path, tracks=tracks, identity=encoder, run_metadata=tmp_path / "missing.run.json")


# --- synthetic --------------------------------------------------------------------------------


def test_video_without_faces(encoder, tmp_path):
    """No face: identity figures are null, temporal and background figures cover the whole frame."""
    frames = moving_texture(8, size=96, shift=(2, 1))
    original = write_video(tmp_path / "texture.mp4", frames, FPS)
    noise = np.random.default_rng(1).normal(0.0, 10.0, frames.shape)
    edited = write_video(tmp_path / "noised.mp4", np.clip(frames + noise, 0, 255).astype(np.uint8), FPS)
    calls = []
    same = evaluate_videos(original, original, identity=encoder, progress=lambda *a: calls.append(a))
    assert {stage for stage, _, _ in calls} == {"faces", "faces (edited)", "evaluate"}
    assert ("evaluate", 8, 8) in calls
    assert same["tracks"] == [] and same["id_sim"] is None and same["tl_id"] is None
    assert same["face_detection_rate"] == 0.0
    assert same["warp_error_ratio"] == pytest.approx(1.0) and same["flicker"] == 0.0
    assert same["background_psnr"] == 100.0
    # a translating texture is what optical flow explains best (what is left is H.264 noise)
    assert same["warp_error_original"] < 0.5 * same["temporal_diff_original"]
    m = evaluate_videos(original, edited, identity=encoder)
    assert m["warp_error_ratio"] > 1.5 and m["flicker"] > 1.0 and m["background_psnr"] < 35
    json.loads(write_metrics_json(m, tmp_path / "m.json").read_text())
    assert (write_html_report(m, original, edited, tmp_path / "r.html")).is_file()


def test_flow_warps_the_previous_frame_onto_the_next():
    """The warp convention: frame t-1 warped with the original's flow lands on frame t."""
    import cv2

    from ipfacediff.evaluation.metrics import _Flow

    frames = moving_texture(2, size=128, shift=(3, 1))
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    noisy = np.clip(frames[1] + np.random.default_rng(0).normal(0, 10, frames[1].shape), 0, 255).astype(np.uint8)
    valid, err_original, err_edited = _Flow().warp_errors(gray[0], gray[1], frames[0], frames[0], frames[1], noisy)
    assert valid.mean() > 0.9  # all but the strip that enters the frame
    assert err_original[valid].mean() < 0.1 < 5 < err_edited[valid].mean()
    assert np.abs(frames[1].astype(float) - frames[0]).mean() > 5  # without the warp the error is large


def test_without_clip_the_summary_and_headline_say_the_edit_was_not_judged():
    from ipfacediff.evaluation.report import _verdict, summary_line

    unjudged = {"id_sim": 0.95, "warp_error_ratio": 1.02, "same_person": True, "clip_direction": None}
    assert "the edit itself was not judged" in summary_line(unjudged)
    headline = _verdict(unjudged)
    assert "identity: " in headline and "not judged" in headline
    judged = {**unjudged, "clip_direction": 0.4}
    assert "not judged" not in summary_line(judged) and "not judged" not in _verdict(judged)
    assert summary_line({}) == "no face to score"
