"""FaceWorld: determinism, alignment, edit regions, clips and their tracks, captions, splits."""

from __future__ import annotations

import numpy as np
import pytest

from ipfacediff.face import CANONICAL_FIVE_POINTS, FaceTracks
from faceworld import (
    EDITS,
    HAIR_COLOURS,
    HELD_OUT_IDS,
    TRAIN_IDS,
    Attributes,
    Identity,
    Lighting,
    Pose,
    align_pose,
    caption,
    dataset,
    dataset_item,
    face_points,
    identity,
    is_held_out,
    render_clip,
    render_face,
    write_clip,
)
from faceworld import render as fw_render
from faceworld.identity import WORLD_SEED

GREY = (128, 128, 128)


def _clear_caches() -> None:
    for fn in (identity, fw_render._geometry, fw_render._eye_parts, fw_render._mouth_parts, fw_render._palette):
        fn.cache_clear()


# --- identities and determinism ----------------------------------------------------------------------


def test_identity_is_fixed_by_its_id():
    a = identity(17)
    assert a == Identity.sample(np.random.default_rng([WORLD_SEED, 17]), id=17)
    assert a != identity(18)
    assert TRAIN_IDS == range(0, 1000) and HELD_OUT_IDS[0] == 1000
    assert not is_held_out(999) and is_held_out(1000) and is_held_out(123456)


def test_render_is_deterministic_and_identities_differ():
    attrs = Attributes(eyeglasses=True, smile=0.7, beard=True, age=0.8)
    pose = Pose(yaw=12.0, pitch=-5.0, roll=3.0, mouth_open=0.4)
    first = render_face(identity(17), attrs, pose, size=64, background=5, lighting=Lighting(azimuth=40.0))
    _clear_caches()  # rebuild every cached part from scratch: same bytes
    again = render_face(identity(17), attrs, pose, size=64, background=5, lighting=Lighting(azimuth=40.0))
    assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
    assert first.tobytes() == again.tobytes()

    plain = [render_face(identity(i), size=64, background=GREY).astype(float) for i in (17, 18, 1017)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(plain[i] - plain[j]).mean() > 8.0


# --- aligned crops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 256])
def test_neutral_render_is_an_aligned_crop(size):
    for i in [*range(0, 40, 3), 1000, 1999]:
        pts = face_points(identity(i), size=size)
        assert np.abs(pts - CANONICAL_FIVE_POINTS * size).max() <= 1.0 * size / 64
    # The features are where the points say: pupils darker than the skin below the eyes.
    img = render_face(identity(3), size=size, background=GREY).astype(float).mean(-1)
    pts = face_points(identity(3), size=size)
    for eye in pts[:2]:
        x, y = np.round(eye).astype(int)
        cheek = img[y + round(0.12 * size), x]
        assert img[y, x] < cheek - 40


def test_align_pose_aligns_turned_heads():
    idt = identity(5)
    pose = align_pose(idt, Pose(yaw=15.0, pitch=-6.0), size=64)
    pts = face_points(idt, pose, size=64)
    # The weighted fit lands the eyes on the canonical ones; nose and mouth follow the head turn.
    assert np.abs(pts[:2] - CANONICAL_FIVE_POINTS[:2] * 64).max() < 1.5
    item = dataset_item("train", 0)
    eyes = face_points(identity(item.identity_id), item.pose, size=64)[:2]
    assert np.abs(eyes - CANONICAL_FIVE_POINTS[:2] * 64).max() < 3


# --- edits ---------------------------------------------------------------------------------------


def test_edits_touch_only_their_region_in_aligned_crops():
    size = 64
    for i in (0, 14, 23, 1003):
        idt = identity(i)
        base = Attributes()
        before = render_face(idt, base, size=size, background=i).astype(int)
        for edit in EDITS.values():
            if edit.name == "blonde_hair" and idt.hair_name == "blonde":
                continue
            after = render_face(idt, edit.apply(base), size=size, background=i).astype(int)
            diff = np.abs(after - before)
            region = edit.mask(size, dilate=1.5 / size)
            assert diff[~region].max() == 0, (i, edit.name)
            assert diff[region].mean() > 1.0, (i, edit.name)


def test_contact_sheet(tmp_path):
    from faceworld.cli import main
    from faceworld.sheet import SHEET_COLUMNS, contact_sheet

    sheet = contact_sheet([0, 1000], size=32)
    assert sheet.shape == (64, 32 * len(SHEET_COLUMNS), 3)
    main(["render", "sheet", "--ids", "1", "--size", "24", "--upscale", "1", "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 0


def test_faceworld_commands_are_typer_subcommands_with_one_line_errors(tmp_path, capsys):
    """`ipfacediff faceworld` and `python -m faceworld` are one typer app: every
    subcommand has its --help, and a mistake is one `error:` line with exit code 2."""
    from ipfacediff.cli import main as cli_main
    from faceworld.cli import main

    def run(command, argv):
        try:
            command(argv)
            code = 0
        except SystemExit as done:
            code = done.code
        out = capsys.readouterr()
        return code, out.out, out.err

    code, listing, _ = run(cli_main, ["faceworld", "--help"])
    assert code == 0 and all(name in listing for name in ("train", "oracles", "adapters", "render"))
    for argv, options in (
        (["train"], ["--preset", "--device", "--seed", "--resume"]),
        (["oracles"], ["--preset", "--device", "--seed", "--workers"]),
        (["adapters"], ["--preset", "--identity-net", "--edits", "--seed", "--resume", "--paired"]),
        (["render", "sheet"], ["--out", "--size", "--ids", "--upscale"]),
        (["render", "clip"], ["--ids", "--seed", "--frames", "--size", "--edit", "--tracks"]),
    ):
        code, text, _ = run(main, [*argv, "--help"])
        assert code == 0 and "python -m faceworld " + " ".join(argv) in " ".join(text.split())
        assert all(option in text for option in options), (argv, text)
    for argv, message in (
        (["render", "clip", str(tmp_path / "c.mp4"), "--edit", "wings"], "--edit must be one of"),
        (["render", "sheet", "--ids", "one,two"], "--ids must be identity numbers"),
        (["train", str(tmp_path / "m"), "--preset", "huge"], "--preset must be one of"),
    ):
        code, _, err = run(main, argv)
        assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("module", ["faceworld", "ipfacediff.faceworld"])
def test_python_m_runs_the_group_in_a_process_of_its_own(module, tmp_path):
    """``python -m faceworld`` (and the deprecated ``python -m ipfacediff.faceworld``): the core's
    runner, so a usage mistake is one ``error:`` line naming the program, with exit code 2."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", module, "render", "clip", str(tmp_path / "c.mp4"), "--frames", "x"]
    done = subprocess.run(argv, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: render clip: Invalid value for '--frames'")
    assert lines[0].endswith(f"(see `python -m {module} render clip --help`)")
    assert not (tmp_path / "c.mp4").exists()


def test_the_demo_edits_the_clip_faceworld_registers(tmp_path):
    """``ipfacediff demo`` names no FaceWorld module: its clip comes through the entry point."""
    from faceworld.scene import demo_clip as registered
    from ipfacediff.demo import demo_clip
    from ipfacediff.video import probe_video

    tracks = demo_clip(tmp_path / "d.mp4", frames=3)
    assert tracks.to_json() == registered(frames=3).tracks.to_json()
    assert probe_video(tmp_path / "d.mp4").frame_count == 3 and not (tmp_path / "d.tone.mp4").exists()


def test_edit_definitions():
    assert set(EDITS) == {"eyeglasses", "blonde_hair", "beard", "smile"}
    base = Attributes()
    for edit in EDITS.values():
        edited = edit.apply(base)
        assert edited != base and edit.fragment in edit.target_caption(base)
        mask = edit.mask(64)
        assert mask.dtype == bool and mask.shape == (64, 64) and 0.02 < mask.mean() < 0.95
    assert EDITS["blonde_hair"].apply(base).hair_colour == "blonde"
    # The hair region leaves the inner face alone; the others are local.
    hair = EDITS["blonde_hair"].mask(64)
    assert not hair[32, 32] and hair[5, 32]
    assert EDITS["eyeglasses"].mask(64)[30, 24] and EDITS["smile"].mask(64)[46, 32] and EDITS["beard"].mask(64)[58, 32]


def test_captions():
    assert caption(Attributes()) == "a face"
    assert caption(Attributes(smile=1.0, hair_colour="blonde", eyeglasses=True)) == (
        "a smiling face with blonde hair and eyeglasses"
    )
    assert caption(Attributes(beard=True)) == "a face with a beard"
    assert caption(Attributes(age=0.9, hat=True, beard=True, hair_colour="grey")) == (
        "an old face with grey hair, a beard and a hat"
    )
    assert caption(Attributes(smile=0.2)) == "a face"
    with pytest.raises(ValueError):
        Attributes(hair_colour="purple")
    assert "blonde" in HAIR_COLOURS


# --- scene clips ------------------------------------------------------------------------------------


def test_attribute_change_re_renders_the_same_clip_edited():
    clip = render_clip([14, 1005], [Attributes(), Attributes(eyeglasses=True)], seed=3, frames=5, size=192)
    frames = clip.array()
    assert frames.shape == (5, 192, 192, 3)
    tracks = clip.tracks
    for edit in EDITS.values():
        edited = clip.with_edit(edit, face=0)
        for k in (0, 1):
            assert [edited.pose(k, f) for f in range(5)] == [clip.pose(k, f) for f in range(5)]
            assert edited.lighting(k) == clip.lighting(k)
        inside = []
        for f in range(5):
            diff = np.abs(edited.frame(f).astype(int) - frames[f].astype(int)).mean(-1)
            region = clip.edit_mask(edit, f, face=0, dilate_px=2)
            assert diff[~region].mean() < 0.05 and diff[~region].max() <= 2, (edit.name, f)
            inside.append(diff[region].mean())
        assert np.mean(inside) > 1.0, edit.name
        edited_tracks = edited.tracks
        for a, b in zip(tracks.tracks, edited_tracks.tracks):
            if edit.name == "smile" and a.id == 0:  # a smile moves the mouth corners
                assert all(np.allclose(p[:3], q[:3]) for p, q in zip(a.points, b.points))
            else:
                assert all(np.array_equal(p, q) for p, q in zip(a.points, b.points)) and a.boxes == b.boxes


def test_clip_motion_depends_on_the_seed_only():
    clip = render_clip([3], seed=8, frames=12, size=128)
    longer = render_clip([3], seed=8, frames=20, size=128)
    other = clip.with_identities([4])
    assert np.array_equal(clip.frame(7), longer.frame(7))
    assert [clip.pose(0, f) for f in range(12)] == [other.pose(0, f) for f in range(12)]
    poses = [clip.pose(0, f) for f in range(12)]
    assert len({round(p.yaw, 3) for p in poses}) > 6  # it moves
    assert not np.array_equal(clip.frame(0), render_clip([3], seed=9, frames=12, size=128).frame(0))


def test_ground_truth_tracks_round_trip_and_contain_the_points(tmp_path):
    clip = render_clip([2, 9], [Attributes(beard=True), Attributes(hat=True)], seed=1, frames=4, size=160)
    tracks = clip.tracks
    assert (tracks.frames, tracks.width, tracks.height, tracks.fps) == (4, 160, 160, 12.0)
    again = FaceTracks.from_json(tracks.to_json())
    assert [t.id for t in again.tracks] == [0, 1]
    for t, u in zip(tracks.tracks, again.tracks):
        assert t.frames == u.frames == [0, 1, 2, 3]
        assert np.allclose(t.boxes, u.boxes, atol=0.01)
        for box, pts, outline in zip(t.boxes, t.points, t.outlines):
            assert pts.shape == (5, 2) and outline.shape == (36, 2)
            assert (pts[:, 0] > box[0]).all() and (pts[:, 0] < box[2]).all()
            assert (pts[:, 1] > box[1]).all() and (pts[:, 1] < box[3]).all()
            assert (pts >= 0).all() and (pts < 160).all()
        assert np.allclose(np.stack(t.points), np.stack(u.points), atol=0.01)
    video, track_file = write_clip(clip, tmp_path / "clip.mp4", tmp_path / "clip.json")
    assert video.stat().st_size > 0
    loaded = FaceTracks.load(track_file)
    assert len(loaded.tracks) == 2 and loaded.frames == 4
    from ipfacediff.video import probe_video

    info = probe_video(video)
    assert (info.width, info.height) == (160, 160)


# --- training set ----------------------------------------------------------------------------------


def test_dataset_splits_and_determinism():
    train = list(dataset("train", 60, size=32, seed=4))
    held = list(dataset("held_out", 20, size=32, seed=4))
    assert all(s.identity_id in TRAIN_IDS and not is_held_out(s.identity_id) for s in train)
    assert all(is_held_out(s.identity_id) for s in held)
    assert len({s.identity_id for s in train}) > 40
    for s in train[:10]:
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert s.caption == caption(s.attributes)
    again = list(dataset("train", 3, size=32, seed=4))
    assert all(a.image.tobytes() == b.image.tobytes() and a.attributes == b.attributes for a, b in zip(train, again))
    assert {s.attributes.eyeglasses for s in train} == {True, False}
    # An item re-rendered with an edit is the edit's ground truth: only the (posed) region changes.
    item = dataset_item("train", 5, seed=4)
    edit = EDITS["eyeglasses"]
    a = item.render(64, item.attributes.replace(eyeglasses=False)).astype(int)
    b = item.render(64, item.attributes.replace(eyeglasses=True)).astype(int)
    assert np.abs(a - b)[~item.edit_mask(edit, 64, dilate_px=1.5)].max() == 0
