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
    from faceworld import HELD_OUT_IDS, render_clip
    from faceworld.oracles import AttributeOracle
    from faceworld.scene import write_clip
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


# Phone-like timestamps (ms): uneven gaps, and two frames 20 ms apart at 0.50 s and 0.52 s.
VFR_MS = [0, 100, 150, 400, 450, 500, 520, 700, 800, 850, 900]


def vfr_gray_clip(path):
    """Frame ``i`` is uniform gray ``20 * i`` shown at ``VFR_MS[i]``: made with PyAV directly, as a
    phone's file comes (its own fine time base, uneven pts), not with our writer."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 90_000)
        for i, ms in enumerate(VFR_MS):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms * 90, Fraction(1, 90_000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def shown_at(path) -> list[float]:
    """Presentation times in seconds, as a player reads them."""
    import av

    with av.open(str(path)) as container:
        return [float(frame.time) for frame in container.decode(video=0)]


def test_a_variable_frame_rate_edit_keeps_every_frame_at_its_time_and_the_range_is_real_time(
    tiny_dir, tmp_path, capsys
):
    clip = vfr_gray_clip(tmp_path / "phone.mp4")
    out = tmp_path / "out.mp4"
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(out),
            "-p",
            "x",
            "--model",
            str(tiny_dir),
            "--whole-frame",
            "--steps",
            "2",
            "--start",
            "0.5",
            "--end",
            "0.55",
            "--fade",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capsys,
    )
    assert code == 0, stderr
    assert shown_at(out) == pytest.approx([ms / 1000 for ms in VFR_MS], abs=1e-6)
    source, edited = read_frames(clip), read_frames(out)
    assert len(edited) == len(source) == len(VFR_MS)
    # The frames at 0.50 s and 0.52 s are the range; every other frame is its own source frame,
    # in its own place (each gray level once), so none was dropped, repeated or moved.
    inside = {VFR_MS.index(500), VFR_MS.index(520)}
    outside = [i for i in range(len(VFR_MS)) if i not in inside]
    assert [round(float(edited[i].mean()) / 20) for i in outside] == outside
    assert min(psnr(source[i], edited[i]) for i in outside) >= 45
    assert all(psnr(source[i], edited[i]) < 45 for i in inside)
    report = json.loads((tmp_path / "out.run.json").read_text())
    assert "frames 5-6 of 11" in report["message"]
    # `faces` and `evaluate` read the same frames as the edit.
    code, _, stderr = run(["faces", str(clip), "--json", str(tmp_path / "tracks.json")], capsys)
    assert code == 0, stderr
    assert json.loads((tmp_path / "tracks.json").read_text())["frames"] == len(VFR_MS)
    code, _, stderr = run(["evaluate", str(clip), str(out), "--json", str(tmp_path / "metrics.json")], capsys)
    assert code == 0, stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["frames"] == len(VFR_MS)


def test_a_range_on_a_variable_frame_rate_clip_selects_by_each_frames_time():
    settings = EditSettings(prompt="x", start="0.5", end="0.55")
    times = [ms / 1000 for ms in VFR_MS]
    assert settings.frame_range(10.0, len(VFR_MS), times=times) == range(5, 7)
    assert EditSettings(prompt="x", start="0.51").frame_range(10.0, len(VFR_MS), times=times) == range(6, 11)
    assert EditSettings(prompt="x", start="frame:2", end="frame:4").frame_range(10.0, 11, times=times) == range(2, 4)
