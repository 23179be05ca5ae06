"""Tracking through occlusion (#36): a face behind a hand, a microphone, a cup or a passing board.

A partly covered face stays one track in every frame, its alignment as steady as without the
occluder; a fully covered face is left out of its track (so passes through unedited) and keeps its
track when it comes back. Measured on FaceWorld occluded clips (ground truth known) and on
closeup.mp4 with FaceWorld's occluders composited across the face (skipped without ../shared).

Jitter: the mean over the occluded frames of |second difference over time| of the aligned crop's
corners in the frame (``alignment_transforms(track, 1)`` inverted), in crop sides: how much the
crop shakes on top of moving with the face. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from faceworld import OCCLUDER_KINDS, occlude_frames, render_clip
from ipfacediff.face import _apply, _invert, alignment_transforms, track_faces
from ipfacediff.video import read_frames

SQUARE = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
FRAMES = 24


def corners(track) -> dict[int, np.ndarray]:
    return {f: _apply(_invert(M), SQUARE) for f, M in alignment_transforms(track, 1).items()}


def jitter(c: dict[int, np.ndarray], frames) -> float:
    side = np.mean([np.linalg.norm(v[1] - v[0]) for v in c.values()])
    steps = [
        np.linalg.norm(c[f + 1] - 2 * c[f] + c[f - 1], axis=1).mean() for f in frames if {f - 1, f, f + 1} <= set(c)
    ]
    return float(np.mean(steps) / side)


def error(c: dict[int, np.ndarray], truth: dict[int, np.ndarray], frames) -> float:
    side = np.mean([np.linalg.norm(v[1] - v[0]) for v in truth.values()])
    return float(np.mean([np.linalg.norm(c[f] - truth[f], axis=1).mean() for f in frames]) / side)


@pytest.fixture(scope="module")
def world():
    plain = render_clip(1010, seed=1010, frames=FRAMES, size=256)
    tracked = {
        kind: track_faces(iter(plain.with_occluders([kind] if kind else [])), fps=plain.fps)
        for kind in [None, *OCCLUDER_KINDS]
    }
    return plain, tracked


@pytest.mark.parametrize("kind", ["hand", "microphone", "cup"])
def test_a_partly_covered_face_is_one_steady_track_in_every_frame(world, kind):
    plain, tracked = world
    clip = plain.with_occluders([kind])
    covered = [i for i in range(FRAMES) if clip.face_coverage(0, i) > 0.05]
    assert max(clip.face_coverage(0, i) for i in covered) > (0.5 if kind == "hand" else 0.1)
    assert len(tracked[kind].tracks) == 1
    track = tracked[kind].tracks[0]
    assert track.frames == list(range(FRAMES)), "the edit would switch off while the occluder passes"
    ours, without = corners(track), corners(tracked[None].tracks[0])
    truth = corners(plain.tracks.tracks[0])
    print(
        f"\n{kind}: jitter {jitter(ours, covered):.4f} (unoccluded {jitter(without, covered):.4f}), "
        f"error to truth {error(ours, truth, covered):.3f} (unoccluded {error(without, truth, covered):.3f}) crop sides"
    )
    assert jitter(ours, covered) <= 2 * jitter(without, covered) + 0.002
    assert error(ours, truth, covered) <= 0.05


def test_a_fully_covered_face_is_left_out_of_its_track_and_keeps_it(world):
    plain, tracked = world
    clip = plain.with_occluders(["object"])
    coverage = [clip.face_coverage(0, i) for i in range(FRAMES)]
    hidden = [i for i, c in enumerate(coverage) if c > 0.95]
    assert len(hidden) >= 6  # longer than the tracker's max_gap: without rejoining, two tracks
    assert len(tracked["object"].tracks) == 1
    track = tracked["object"].tracks[0]
    assert not set(hidden) & set(track.frames)
    assert {i for i, c in enumerate(coverage) if c < 0.3} <= set(track.frames)
    visible = [f for f in track.frames if coverage[f] < 0.3]
    assert error(corners(track), corners(plain.tracks.tracks[0]), visible) <= 0.05


def test_a_face_that_comes_back_elsewhere_is_a_new_track():
    """Rejoining needs the face back where it was hidden: after the board, another scene whose
    face is elsewhere gives a track of its own."""
    hidden = render_clip(1010, seed=1010, frames=FRAMES, size=256, occluders=["object"])
    elsewhere = render_clip(1010, seed=1010, frames=FRAMES, size=(256, 256))
    far = [np.roll(elsewhere.frame(i), 110, axis=1) for i in range(FRAMES)]
    covered = [i for i in range(FRAMES) if hidden.face_coverage(0, i) > 0.95]
    frames = [hidden.frame(i) if i <= covered[-1] else far[i] for i in range(FRAMES)]
    tracks = track_faces(iter(frames), fps=12.0)
    assert len(tracks.tracks) == 2
    assert tracks.tracks[0].frames[-1] < covered[0] and tracks.tracks[1].frames[0] > covered[-1]


@pytest.fixture(scope="module")
def closeup(shared_clip):
    frames = read_frames(shared_clip("closeup.mp4"))[:FRAMES]
    reference = track_faces(iter(frames), fps=10.0)
    assert len(reference.tracks) == 1
    face = reference.tracks[0]
    to_frame = {f: _invert(M) for f, M in alignment_transforms(face, 1).items()}
    return frames, face, to_frame


def box_share(face, f: int, coverage: np.ndarray) -> float:
    x0, y0, x1, y1 = (int(round(v)) for v in face.boxes[face.position(f)])
    return float(coverage[f, y0:y1, x0:x1].mean())


def test_a_real_face_behind_a_passing_hand_is_one_steady_track(closeup):
    frames, face, to_frame = closeup
    composite, coverage = occlude_frames(frames, to_frame, ["hand"])
    covered = [f for f in range(FRAMES) if box_share(face, f, coverage) > 0.05]
    assert max(box_share(face, f, coverage) for f in covered) > 0.25  # the face box reaches past the face
    tracks = track_faces(iter(composite), fps=10.0)
    assert len(tracks.tracks) == 1 and tracks.tracks[0].frames == list(range(FRAMES))
    ours, without = corners(tracks.tracks[0]), corners(face)
    print(
        f"\ncloseup + hand: jitter {jitter(ours, covered):.4f} (unoccluded {jitter(without, covered):.4f}), "
        f"offset from the unoccluded track {error(ours, without, covered):.3f} crop sides"
    )
    assert jitter(ours, covered) <= 0.015
    assert error(ours, without, covered) <= 0.05


def test_a_real_face_hidden_by_a_board_is_not_in_its_track_on_those_frames(closeup):
    frames, face, to_frame = closeup
    composite, coverage = occlude_frames(frames, to_frame, ["object"])
    hidden = [f for f in range(FRAMES) if box_share(face, f, coverage) > 0.95]
    assert hidden
    tracks = track_faces(iter(composite), fps=10.0)
    assert len(tracks.tracks) == 1
    track = tracks.tracks[0]
    assert not set(hidden) & set(track.frames)
    assert {f for f in range(FRAMES) if box_share(face, f, coverage) == 0} <= set(track.frames)
