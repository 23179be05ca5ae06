"""Editing part of a clip (--start/--end, with a fade), and each face with its own prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ipfacediff.errors import UserError
from ipfacediff.settings import EditSettings
from ipfacediff.video import read_frames

from test_cli import run


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_frames_outside_the_range_pass_through_and_inside_change(shared_clip, tiny_dir, tmp_path, capsys):
    clip = shared_clip("closeup.mp4")  # 40 frames at 10 fps
    out = tmp_path / "out.mp4"
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(out),
            "-p",
            "a face with eyeglasses",
            "--model",
            str(tiny_dir),
            "--resolution",
            "64",
            "--steps",
            "4",
            "--start",
            "1",
            "--end",
            "2",
            "--fade",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capsys,
    )
    assert code == 0, stderr
    source, edited = read_frames(clip), read_frames(out)
    assert len(edited) == len(source) == 40
    outside = [i for i in range(40) if not 10 <= i < 20]
    assert min(psnr(source[i], edited[i]) for i in outside) >= 45
    assert all(psnr(source[i], edited[i]) < 45 for i in range(12, 18))  # past the fade: the whole edit
    report = json.loads((tmp_path / "out.run.json").read_text())
    assert report["faces"][0]["frames"] == 10 and report["settings"]["start"] == "1"
    assert "frames 10-19 of 40" in report["message"]


def test_a_face_left_unedited_by_its_own_prompt_passes_through(shared_clip, tiny_dir, tmp_path, capsys):
    clip = shared_clip("closeup.mp4")
    out = tmp_path / "out.mp4"
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(out),
            "-p",
            "a face with eyeglasses",
            "--model",
            str(tiny_dir),
            "--resolution",
            "64",
            "--steps",
            "2",
            "--face-prompt",
            "0=",
            "--end",
            "frame:8",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert min(psnr(a, b) for a, b in zip(read_frames(clip), read_frames(out))) >= 45
    faces = json.loads((tmp_path / "out.run.json").read_text())["faces"]
    assert faces == [{"id": 0, "frames": 0, "prompt": None}]


@pytest.mark.parametrize(
    "start, end, words",
    [
        ("3", "2", "empty or reversed"),
        ("1", "1", "empty or reversed"),
        ("9", "", "starts after the clip's last frame"),
        ("frame:40", "", "starts after"),
        ("-1", "", "--start must be seconds"),
        ("", "soon", "--end must be seconds"),
    ],
)
def test_a_bad_range_is_one_line_before_any_work(start, end, words):
    with pytest.raises(UserError, match=words) as caught:
        EditSettings(prompt="x", start=start, end=end).frame_range(10.0, 40)
    assert "\n" not in str(caught.value)


def test_a_bad_range_exits_2_without_output(shared_clip, tmp_path, capsys):
    clip = shared_clip("closeup.mp4")
    code, _, stderr = run(["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "a face", "--start", "5"], capsys)
    assert code == 2 and "starts after the clip's last frame" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.mp4").exists()


def test_the_fade_rises_after_start_and_falls_before_end():
    settings = EditSettings(prompt="x", start="frame:10", end="frame:20", fade=3)
    frames = settings.frame_range(10.0, 40)
    weights = [settings.fade_weight(f, frames) for f in frames]
    assert weights == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    whole = EditSettings(prompt="x", fade=3)  # no range: no fade at the clip's ends
    assert all(whole.fade_weight(f, whole.frame_range(10.0, 40)) == 1.0 for f in range(40))


def test_two_faces_each_get_their_own_edit_and_the_oracle_sees_it(tmp_path, capsys):
    """A FaceWorld scene of two held-out people: eyeglasses on face 0, a beard on face 1."""
    from ipfacediff.face import FaceTracks, alignment_transforms, crop_face
    from ipfacediff.faceworld import HELD_OUT_IDS, render_clip
    from ipfacediff.faceworld.oracles import AttributeOracle
    from ipfacediff.faceworld.scene import write_clip
    from ipfacediff.job import SHIPPED_MODELS

    if not (SHIPPED_MODELS / "oracles" / "attributes").is_dir():
        pytest.skip("the FaceWorld models are not shipped in this checkout")
    people = list(HELD_OUT_IDS)[:2]
    clip, tracks_path = write_clip(
        render_clip(people, seed=3, frames=8, size=256), tmp_path / "in.mp4", tmp_path / "in.tracks.json"
    )
    out = tmp_path / "out.mp4"
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(out),
            "-p",
            "a face with eyeglasses",
            "--face-prompt",
            "1=a face with a beard",
            "--tracks",
            str(tracks_path),
            "--steps",
            "20",
        ],
        capsys,
    )
    assert code == 0, stderr
    oracle = AttributeOracle.from_pretrained(SHIPPED_MODELS / "oracles" / "attributes")
    tracks = FaceTracks.load(tracks_path)

    def calls(path, track) -> dict[str, bool]:
        frames = read_frames(path)
        crops = np.stack([crop_face(frames[f], M, 64) for f, M in alignment_transforms(track, 64).items()])
        return {k: bool(v.mean() > 0.5) for k, v in oracle.predict_proba(crops).items()}

    first, second = tracks.tracks
    before, after = calls(clip, first), calls(out, first)
    assert not before["eyeglasses"] and after["eyeglasses"] and not after["beard"]
    before, after = calls(clip, second), calls(out, second)
    assert not before["beard"] and after["beard"] and not after["eyeglasses"]
    faces = {f["id"]: f for f in json.loads((tmp_path / "out.run.json").read_text())["faces"]}
    assert faces[0]["prompt"] == "a face with eyeglasses" and list(faces[0]["edit_adapters"]) == ["eyeglasses"]
    assert faces[1]["prompt"] == "a face with a beard" and list(faces[1]["edit_adapters"]) == ["beard"]
