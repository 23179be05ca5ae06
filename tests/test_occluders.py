"""FaceWorld occluders: drawn in front of the face, their true coverage, and the truth of an edit behind them."""

from __future__ import annotations

import numpy as np
import pytest

from faceworld import EDITS, OCCLUDER_KINDS, Occluder, load_occluder_masks, render_clip, write_clip

FRAMES = 9


@pytest.fixture(scope="module")
def clips():
    plain = render_clip(1003, seed=1003, frames=FRAMES, size=96)
    return plain, {kind: plain.with_occluders([kind]) for kind in OCCLUDER_KINDS}


@pytest.mark.parametrize("kind", OCCLUDER_KINDS)
def test_the_occluder_changes_exactly_the_pixels_its_mask_covers(clips, kind):
    """Where the true mask is 0 the frame is the plain clip's to the byte; where it is 1 the face
    behind does not show (the same pixels over two different people); in between, both mix."""
    plain, occluded = clips
    clip = occluded[kind]
    other = clip.with_identities([1011])
    covered_somewhere = False
    for i in range(FRAMES):
        mask = clip.occluder_mask(i)
        assert mask.dtype == np.float32 and mask.shape == (96, 96) and 0 <= mask.min() and mask.max() <= 1
        frame, behind = clip.frame(i).astype(int), plain.frame(i).astype(int)
        assert np.array_equal(frame[mask == 0], behind[mask == 0])
        solid = mask == 1
        assert np.array_equal(frame[solid], other.frame(i).astype(int)[solid])
        changed = np.abs(frame - behind).max(axis=-1) > 0
        assert not (changed & (mask == 0)).any()
        covered_somewhere |= bool(solid.sum() > 20 and (changed & solid).mean() > 0)
    assert covered_somewhere


def test_the_truth_of_an_occluded_edit_is_the_edit_with_the_same_occluder_on_top(clips):
    plain, occluded = clips
    clip = occluded["hand"]
    truth = clip.with_edit(EDITS["eyeglasses"])
    assert truth.occluders == clip.occluders
    i = FRAMES // 2
    mask = clip.occluder_mask(i)
    assert np.array_equal(truth.occluder_mask(i), mask)
    edited_behind = plain.with_edit(EDITS["eyeglasses"]).frame(i)
    assert np.array_equal(truth.frame(i)[mask == 0], edited_behind[mask == 0])
    assert np.array_equal(truth.frame(i)[mask == 1], clip.frame(i)[mask == 1])
    # The edit shows where the hand is not, and the tracks are the unoccluded ones (the face is there).
    assert (truth.frame(i) != clip.frame(i))[mask == 0].any()
    assert truth.tracks.to_json() == plain.tracks.to_json() and clip.with_occluders(()) == plain


def test_each_kind_covers_the_face_as_described(clips):
    """The hand and the cup pass (nothing, then part of the face, then nothing), the microphone
    stays at the mouth, the board hides the whole face in the middle frames only."""
    _, occluded = clips
    cover = {k: np.array([c.face_coverage(0, i) for i in range(FRAMES)]) for k, c in occluded.items()}
    middle = FRAMES // 2
    assert cover["hand"][0] < 0.02 and cover["hand"][-1] < 0.02 and 0.3 < cover["hand"][middle] < 0.9
    assert cover["cup"][0] < 0.02 and 0.1 < cover["cup"][middle] < 0.5
    assert 0.05 < cover["microphone"].min() and cover["microphone"].max() < 0.3
    assert cover["object"][0] < 0.02 and cover["object"][middle] == pytest.approx(1.0, abs=1e-3)
    assert cover["object"].max() - cover["object"][[0, -1]].max() > 0.98


def test_occluders_are_checked():
    with pytest.raises(ValueError, match="unknown occluder 'umbrella'"):
        Occluder("umbrella")
    with pytest.raises(ValueError, match="covers a face of the clip"):
        render_clip(3, frames=2, size=64, occluders=[Occluder("hand", face=1)])


def test_write_clip_saves_the_masks_beside_the_video(tmp_path, clips):
    from ipfacediff.face import FaceTracks
    from ipfacediff.video import read_frames

    _, occluded = clips
    clip = occluded["object"]
    video, tracks = write_clip(clip, tmp_path / "c.mp4", tmp_path / "c.json", tmp_path / "c.occluder.npz")
    assert len(read_frames(video)) == FRAMES and FaceTracks.load(tracks).frames == FRAMES
    with np.load(tmp_path / "c.occluder.npz") as data:
        assert data["masks"].dtype == np.uint8 and data["masks"].shape == (FRAMES, 96, 96)
        assert list(data["kinds"]) == ["object"]
        coverage = data["face_coverage"]
    assert coverage.shape == (1, FRAMES) and coverage[0, FRAMES // 2] == pytest.approx(1.0, abs=1e-3)
    masks = load_occluder_masks(tmp_path / "c.occluder.npz")
    assert np.abs(masks[3] - clip.occluder_mask(3)).max() <= 0.5 / 255 + 1e-6


def test_render_clip_command_writes_the_occluded_clip_and_its_mask(tmp_path, capsys):
    from faceworld.cli import main

    def run(argv):
        try:
            main(argv)
            code = 0
        except SystemExit as done:
            code = done.code
        return code, capsys.readouterr()

    out = tmp_path / "c.mp4"
    code, streams = run(["render", "clip", str(out), "--ids", "3", "--frames", "3", "--size", "64"])
    assert code == 0 and not (tmp_path / "c.occluder.npz").exists()
    argv = ["render", "clip", str(out), "--ids", "3", "--frames", "3", "--size", "64", "--occluder", "hand,cup"]
    code, streams = run(argv)
    assert code == 0 and streams.out.split() == [str(out), str(tmp_path / "c.json"), str(tmp_path / "c.occluder.npz")]
    with np.load(tmp_path / "c.occluder.npz") as data:
        assert list(data["kinds"]) == ["hand", "cup"] and data["masks"].shape == (3, 64, 64)
    for argv, message in (
        ([str(tmp_path / "d.mp4"), "--occluder", "umbrella"], "--occluder must be one of"),
        ([str(tmp_path / "d.mp4"), "--occluder-mask", str(tmp_path / "m.npz")], "--occluder-mask needs --occluder"),
    ):
        code, streams = run(["render", "clip", *argv])
        assert code == 2 and streams.err.startswith(f"error: {message}") and streams.err.count("\n") == 1
        assert not (tmp_path / "d.mp4").exists()
