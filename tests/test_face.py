"""The face stage: detection, tracking, alignment, masks, paste-back and the track file.

Real-clip tests use ../shared/data/clips (skipped when absent); the rest run on synthetic input.
Figures the lead reports (detection rate, PSNR, jitter) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from ipfacediff.errors import UserError
from ipfacediff.face import (
    CANONICAL_FACE_BOX,
    CANONICAL_FIVE_POINTS,
    FaceTrack,
    FaceTracks,
    align_points,
    alignment_transforms,
    crop_face,
    face_mask,
    faces_report,
    min_track_length,
    paste_face,
    require_face,
    similarity_transform,
    track_faces,
)
from ipfacediff.video import probe_video, read_frames

SIZE = 512


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def clip(shared_clip):
    """name -> (frames, tracks), each clip decoded and tracked once per module."""
    cache: dict[str, tuple[np.ndarray, FaceTracks]] = {}

    def get(name: str) -> tuple[np.ndarray, FaceTracks]:
        if name not in cache:
            frames = read_frames(shared_clip(name))
            cache[name] = frames, track_faces(iter(frames), fps=10.0)
        return cache[name]

    return get


# --- real clips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jogger.mp4", "closeup.mp4"])
def test_real_clip_gives_one_track_over_nearly_all_frames(clip, name):
    frames, tracks = clip(name)
    assert (tracks.frames, tracks.width, tracks.height, tracks.fps) == (len(frames), 512, 512, 10.0)
    assert len(tracks.tracks) == 1
    track = tracks.tracks[0]
    rate = len(track.frames) / len(frames)
    with_mesh = sum(o is not None for o in track.outlines) / len(frames)
    print(f"\n{name}: face in {rate:.0%} of frames, mesh landmarks in {with_mesh:.0%}")
    assert rate >= 0.95
    assert track.id == 0
    # The five points are in their canonical order on the image: eyes above nose above mouth.
    p = np.mean(track.points, axis=0)
    assert p[0, 0] < p[1, 0] and p[3, 0] < p[4, 0]
    assert p[:2, 1].max() < p[2, 1] < p[3:, 1].min()


@pytest.mark.parametrize("name", ["jogger.mp4", "closeup.mp4"])
def test_pasting_back_the_unedited_crop_reproduces_the_frame(clip, name):
    frames, tracks = clip(name)
    track = tracks.tracks[0]
    transforms = alignment_transforms(track, SIZE)
    scores = []
    for t in track.frames:
        M = transforms[t]
        for hair in (False, True):
            mask = face_mask(track, t, M, SIZE, hair=hair)
            before = frames[t].copy()
            out = paste_face(frames[t], crop_face(frames[t], M, SIZE), M, mask)
            assert np.array_equal(frames[t], before), "paste_face modified its input"
            scores.append(psnr(out, frames[t]))
    print(f"\n{name}: unedited paste-back PSNR min {min(scores):.1f} dB, mean {np.mean(scores):.1f} dB")
    assert min(scores) >= 40.0


def eye_spread(track: FaceTrack, transforms: dict[int, np.ndarray]) -> float:
    """Std of the eye centres in crop pixels over the clip (RMS distance to their mean position)."""
    eyes = np.array([transforms[t] @ np.c_[p[:2], np.ones(2)].T for t, p in zip(track.frames, track.points)])
    return float(np.sqrt(np.mean(np.sum((eyes - eyes.mean(axis=0)) ** 2, axis=1))))


def crop_shake(frames: np.ndarray, track: FaceTrack, transforms: dict[int, np.ndarray]) -> float:
    """Mean change of the frame-to-frame image shift of the crop's centre (phase correlation): a
    jitter measure that does not reuse the landmarks the transforms were fitted to."""
    window = cv2.createHanningWindow((SIZE // 2, SIZE // 2), cv2.CV_64F)
    centre = slice(SIZE // 4, 3 * SIZE // 4)
    crops = [crop_face(frames[t], transforms[t], SIZE) for t in track.frames]
    grey = [cv2.cvtColor(c, cv2.COLOR_RGB2GRAY)[centre, centre].astype(np.float64) for c in crops]
    shifts = np.array([cv2.phaseCorrelate(a, b, window)[0] for a, b in zip(grey, grey[1:])])
    return float(np.linalg.norm(np.diff(shifts, axis=0), axis=1).mean())


def test_aligned_crop_jitter_on_closeup(clip):
    frames, tracks = clip("closeup.mp4")
    track = tracks.tracks[0]
    raw = alignment_transforms(track, SIZE, smooth=False)
    smooth = alignment_transforms(track, SIZE, smooth=True)
    print(
        f"\ncloseup.mp4 eye-centre std at {SIZE}px: {eye_spread(track, raw):.2f} px unsmoothed, "
        f"{eye_spread(track, smooth):.2f} px smoothed; crop shake (phase correlation): "
        f"{crop_shake(frames, track, raw):.2f} px unsmoothed, {crop_shake(frames, track, smooth):.2f} px smoothed"
    )
    assert eye_spread(track, smooth) <= 1.5
    assert crop_shake(frames, track, smooth) < crop_shake(frames, track, raw)


def test_two_clips_side_by_side_give_two_stable_tracks(shared_clip):
    left, right = read_frames(shared_clip("jogger.mp4")), read_frames(shared_clip("closeup.mp4"))
    side_by_side = np.concatenate([left, right], axis=2)
    tracks = track_faces(iter(side_by_side), fps=10.0)
    assert (tracks.width, tracks.height) == (1024, 512)
    assert [t.id for t in tracks.tracks] == [0, 1]
    for track, (lo, hi) in zip(tracks.tracks, [(0, 512), (512, 1024)]):
        assert track.frames == list(range(len(side_by_side)))
        centres = [(b[0] + b[2]) / 2 for b in track.boxes]
        assert all(lo < c < hi for c in centres), f"track {track.id} left its half of the frame"
    # Same input, same tracks (ids included).
    again = [track_faces(iter(side_by_side[:8]), fps=10.0).to_json() for _ in range(2)]
    assert again[0] == again[1]


def test_small_face_in_a_large_frame_is_found(shared_clip):
    """A 1920x1080 frame with a face about 45 px tall: found by the detection tiles."""
    jogger = read_frames(shared_clip("jogger.mp4"), count=8)
    frames = np.full((8, 1080, 1920, 3), 110, np.uint8)
    frames[:, 300:556, 1300:1556] = [cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in jogger]
    tracks = track_faces(iter(frames), fps=10.0)
    assert len(tracks.tracks) == 1
    track = tracks.tracks[0]
    x0, y0, x1, y1 = np.median(track.boxes, axis=0)
    assert len(track.frames) >= 7 and 1300 < x0 < x1 < 1556 and 300 < y0 < y1 < 556


@pytest.mark.parametrize("fill", [0, 128])
def test_a_face_gone_for_two_frames_is_not_bridged_onto_them(clip, fill):
    """No face, no paint: the face leaves for two black (or grey) frames. The tracker still links
    both sides into one track, but the two frames are not in it, so no edit is pasted on them
    (the paste-back loop of an edit, with a bright crop standing in for the edited face)."""
    frames, _ = clip("closeup.mp4")
    gapped = frames[:12].copy()
    gapped[5:7] = fill
    tracks = track_faces(iter(gapped), fps=10.0)
    assert len(tracks.tracks) == 1
    track = tracks.tracks[0]
    assert track.frames == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert tracks.in_frame(5) == tracks.in_frame(6) == []
    size = 64
    transforms = {face.id: alignment_transforms(face, size) for face in tracks.tracks}
    edited = np.full((size, size, 3), 230, np.uint8)
    for t, frame in enumerate(gapped):
        out = frame
        for face in tracks.in_frame(t):
            M = transforms[face.id][t]
            out = paste_face(out, edited, M, face_mask(face, t, M, size))
        if t in (5, 6):
            assert out.min() == out.max() == fill, f"an edit was pasted on frame {t}, which has no face"
        else:
            assert np.abs(out.astype(int) - frame).max() > 50


def test_a_face_the_mesh_loses_for_two_frames_is_still_bridged(clip):
    """Bridging still works where the frame shows the face: two frames blurred past what the face
    mesh and the detector find are confirmed by the face's look and interpolated."""
    frames, _ = clip("closeup.mp4")
    blurred = frames[:12].copy()
    blurred[5:7] = [cv2.GaussianBlur(f, (0, 0), 32) for f in blurred[5:7]]
    tracks = track_faces(iter(blurred), fps=10.0)
    assert len(tracks.tracks) == 1
    track = tracks.tracks[0]
    assert track.frames == list(range(12))
    for t, w in ((5, 1 / 3), (6, 2 / 3)):
        np.testing.assert_allclose(track.points[t], (1 - w) * track.points[4] + w * track.points[7], atol=1e-6)


def test_shortest_kept_track_scales_with_the_clip(clip):
    """A face in 4 of 8 frames is a face; in 1 of 8 or 2 of 12 frames it is a fluke."""
    assert [min_track_length(n) for n in (1, 2, 3, 8, 9, 12, 16, 20, 400)] == [1, 2, 2, 2, 3, 3, 4, 5, 5]
    frames, _ = clip("closeup.mp4")
    black = np.zeros_like(frames[0])

    def only(present: set[int], count: int) -> list[FaceTrack]:
        return track_faces(iter([frames[t] if t in present else black for t in range(count)]), fps=10.0).tracks

    half = only({2, 3, 4, 5}, 8)
    assert len(half) == 1 and half[0].frames == [2, 3, 4, 5]
    assert only({3}, 8) == []
    assert only({5, 6}, 12) == []


def test_video_without_face_gives_no_tracks_and_require_face_says_so():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (12, 256, 320, 3), dtype=np.uint8)
    gradient = np.broadcast_to(np.linspace(0, 255, 320, dtype=np.uint8)[None, None, :, None], (12, 256, 320, 3))
    for frames in (noise, gradient):
        tracks = track_faces(iter(frames), fps=25.0)
        assert (tracks.frames, tracks.width, tracks.height, tracks.tracks) == (12, 320, 256, [])
        with pytest.raises(UserError) as err:
            require_face(tracks, "empty.mp4")
        message = str(err.value)
        assert message.startswith("no face found in empty.mp4: ") and "\n" not in message
    assert track_faces(iter([]), fps=25.0).tracks == []


# --- track file -------------------------------------------------------------------------------


def synthetic_tracks() -> FaceTracks:
    """Two upright faces: id 3 small on the left, id 5 large on the right (no outlines)."""
    x0, y0, x1, y1 = CANONICAL_FACE_BOX
    in_box = (CANONICAL_FIVE_POINTS - [x0, y0]) / [x1 - x0, y1 - y0]

    def track(track_id: int, x: float, side: float, frames: list[int]) -> FaceTrack:
        boxes = [[x + t, 50.0, x + t + side, 50.0 + side] for t in frames]
        return FaceTrack(track_id, frames, boxes, [in_box * side + b[:2] for b in boxes])

    return FaceTracks(10, 640, 360, 25.0, [track(3, 20, 80, list(range(10))), track(5, 300, 200, [2, 3, 4])])


def test_json_round_trip_keeps_everything(clip):
    _, tracks = clip("closeup.mp4")
    data = json.loads(json.dumps(tracks.to_json()))
    assert set(data) == {"frames", "width", "height", "fps", "tracks"}
    assert {"id", "frames", "boxes"} <= set(data["tracks"][0])
    back = FaceTracks.from_json(data)
    assert back.to_json()["fps"] == tracks.fps and (back.width, back.height) == (tracks.width, tracks.height)
    a, b = tracks.tracks[0], back.tracks[0]
    assert (a.id, a.frames) == (b.id, b.frames)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=0.01)
    np.testing.assert_allclose(a.points, b.points, atol=0.01)
    np.testing.assert_allclose(np.array(a.outlines, float), np.array(b.outlines, float), atol=0.05)
    ta, tb = alignment_transforms(a, SIZE), alignment_transforms(b, SIZE)
    assert max(np.abs(ta[t] - tb[t]).max() for t in a.frames) < 0.1
    assert back.to_json() == data


def test_file_round_trip_and_boxes_only_tracks(tmp_path):
    tracks = synthetic_tracks()
    path = tracks.save(tmp_path / "sub" / "tracks.json")
    assert FaceTracks.load(path).to_json() == tracks.to_json()
    # A ground-truth file with boxes only: points are placed in the boxes, and give the boxes back.
    data = tracks.to_json()
    for t in data["tracks"]:
        del t["points"]
    back = FaceTracks.from_json(data)
    for a, b in zip(tracks.tracks, back.tracks):
        np.testing.assert_allclose(a.points, b.points, atol=0.01)
        M = alignment_transforms(b, SIZE)[b.frames[0]]
        np.testing.assert_allclose(M @ np.c_[b.points[0], np.ones(5)].T, CANONICAL_FIVE_POINTS.T * SIZE, atol=0.05)
        mask = face_mask(b, b.frames[0], M, SIZE)  # the canonical ellipse stands in for an outline
        assert mask[SIZE // 2 + 40, SIZE // 2] == 1.0 and mask[5, 5] == 0.0


def test_track_built_by_hand_with_a_gap():
    """Tracks made by other code (filled in after construction, frames skipped): the two runs are
    smoothed separately and the mask falls back to the canonical ellipse."""
    track = FaceTrack(id=0, frames=[], boxes=[], points=[])
    rng = np.random.default_rng(5)
    for t in [*range(10), *range(30, 40)]:
        x = 50.0 if t < 10 else 250.0
        track.frames.append(t)
        track.points.append(CANONICAL_FIVE_POINTS * 100 + [x, 40] + rng.normal(0, 0.5, (5, 2)))
        track.boxes.append([x, 40, x + 100, 140])
    first = FaceTrack(0, track.frames[:10], track.boxes[:10], track.points[:10])
    whole, alone = alignment_transforms(track, 64), alignment_transforms(first, 64)
    assert all(np.allclose(whole[t], alone[t]) for t in range(10))
    assert face_mask(track, 35, whole[35], 64).max() == 1.0
    assert "outlines" not in FaceTracks(40, 400, 200, 25.0, [track]).to_json()["tracks"][0]


HEADER = {"frames": 10, "width": 64, "height": 64, "fps": 25}


@pytest.mark.parametrize(
    "data",
    [
        {},
        {**HEADER, "tracks": [{"id": 0}]},
        {**HEADER, "tracks": [{"id": 0, "frames": [2, 1], "boxes": [[0, 0, 9, 9]] * 2}]},
        {**HEADER, "tracks": [{"id": 0, "frames": [1], "boxes": [[0, 0, 9]]}]},
        {**HEADER, "tracks": [{"id": 0, "frames": [1], "boxes": [[0, 0, 9, 9]], "points": [[[1, 2]]]}]},
        {**HEADER, "tracks": [{"id": 0, "frames": [1], "boxes": [[0, 0, 9, 9]], "points": [[[1, 2]] * 5]}]},
        {**HEADER, "tracks": [{"id": 0, "frames": [1], "boxes": [[0, 0, 9, 9]]}] * 2},
    ],
)
def test_malformed_track_data_is_a_user_error(data, tmp_path):
    with pytest.raises(UserError):
        FaceTracks.from_json(data)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        FaceTracks.load(tmp_path / "bad.json")


def test_select():
    tracks = synthetic_tracks()
    assert [t.id for t in tracks.select("all").tracks] == [3, 5]
    assert [t.id for t in tracks.select("largest").tracks] == [5]
    assert [t.id for t in tracks.select("3").tracks] == [3]
    assert [t.id for t in tracks.select(" 5,3 ").tracks] == [3, 5]
    assert tracks.select("3").width == 640
    for bad in ["", "biggest", "3,,5", "3;5", "7", "-1"]:
        with pytest.raises(UserError):
            tracks.select(bad)
    empty = FaceTracks(10, 640, 360, 25.0, [])
    assert empty.select("largest").tracks == [] and empty.select("all").tracks == []


# --- geometry, mask, paste ----------------------------------------------------------------------


def test_similarity_transform_recovers_a_known_transform():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -12.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.random.default_rng(1).uniform(0, 100, (5, 2))
    M = similarity_transform(src, src @ rot.T + shift, np.array([1, 2, 3, 4, 5.0]))
    np.testing.assert_allclose(M, np.c_[rot, shift], atol=1e-9)


@pytest.mark.parametrize("speed, gain", [(0.0, 0.7), (4.0, 0.85)])
def test_smoothing_removes_landmark_noise_without_lag(speed, gain):
    """A face of 120 px, still or sliding right, with 1 px landmark noise: the smoothed crop is
    closer to the noise-free one than the raw crop, and does not trail behind the motion."""
    rng = np.random.default_rng(2)
    frames = list(range(60))
    true = [CANONICAL_FIVE_POINTS * 120 + [100 + speed * t, 80] for t in frames]
    noisy = [p + rng.normal(0, 1.0, p.shape) for p in true]
    track = FaceTrack(0, frames, [[0, 0, 1, 1]] * 60, noisy)
    ideal = {t: align_points(p) * SIZE for t, p in zip(frames, true)}

    def error(transforms):  # where the true nose tip lands in the crop, against the ideal crop
        nose = [np.r_[true[t][2], 1.0] for t in frames]
        return np.array([transforms[t] @ n - ideal[t] @ n for t, n in zip(frames, nose)])

    raw, smooth = error(alignment_transforms(track, SIZE, smooth=False)), error(alignment_transforms(track, SIZE))
    rms = lambda e: float(np.sqrt(np.mean(np.sum(e**2, axis=1))))  # noqa: E731
    print(f"\nspeed {speed} px/frame: crop error {rms(raw):.2f} px raw, {rms(smooth):.2f} px smoothed")
    assert rms(smooth) < gain * rms(raw)
    assert abs(smooth[:, 0].mean() - raw[:, 0].mean()) < 0.1  # no lag along the motion, ends included


def test_mask_is_soft_inside_the_face_and_zero_at_the_crop_edge(clip):
    _, tracks = clip("closeup.mp4")
    track = tracks.tracks[0]
    t = track.frames[0]
    M = alignment_transforms(track, 256)[t]
    mask = face_mask(track, t, M, 256)
    hair = face_mask(track, t, M, 256, hair=True)
    assert mask.dtype == np.float32 and mask.shape == (256, 256)
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert ((mask > 0) & (mask < 1)).sum() > 0.05 * (mask > 0).sum(), "edge is not feathered"
    nose = np.round(CANONICAL_FIVE_POINTS[2] * 256).astype(int)
    assert mask[nose[1], nose[0]] == 1.0
    for m in (mask, hair):
        assert m[0].max() == m[-1].max() == m[:, 0].max() == m[:, -1].max() == 0.0
    assert hair[: int(0.35 * 256)].sum() > mask[: int(0.35 * 256)].sum() and (hair >= mask).all()


def test_colour_matching_hides_the_seam_but_keeps_the_edit(clip):
    """An edit that tints the whole crop and darkens a patch in the middle of the face: with
    colour matching the tint is gone at the seam while the patch stays as dark."""
    frames, tracks = clip("closeup.mp4")
    track = tracks.tracks[0]
    t = track.frames[0]
    M = alignment_transforms(track, SIZE)[t]
    mask = face_mask(track, t, M, SIZE)
    edited = crop_face(frames[t], M, SIZE).astype(np.int16) + [40, -20, 0]
    x, y = np.round(CANONICAL_FIVE_POINTS[2] * SIZE).astype(int)
    edited[y - 30 : y + 30, x - 30 : x + 30] -= 80
    edited = np.clip(edited, 0, 255).astype(np.uint8)
    frame_mask = cv2.warpAffine(mask, M, (512, 512), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    seam = (frame_mask > 0.05) & (frame_mask < 0.6)
    inner = np.zeros((SIZE, SIZE), np.float32)
    inner[y - 20 : y + 20, x - 20 : x + 20] = 1
    patch = cv2.warpAffine(inner, M, (512, 512), flags=cv2.WARP_INVERSE_MAP) > 0.99
    seam_error, patch_change = {}, {}
    for match in (False, True):
        out = paste_face(frames[t], edited, M, mask, match_colour=match).astype(float)
        seam_error[match] = np.abs(out - frames[t])[seam].mean()
        patch_change[match] = (frames[t] - out)[patch].mean()  # darkening of the patch (mean over RGB)
    print(f"\nseam colour error: {seam_error[False]:.1f} without matching, {seam_error[True]:.1f} with")
    assert seam_error[True] < 0.35 * seam_error[False]
    assert patch_change[True] > 0.8 * 80, "colour matching undid the edit inside the face"


def test_paste_near_the_frame_edge():
    """A face half out of the frame: the crop mirrors the outside, paste-back stays in the frame."""
    rng = np.random.default_rng(3)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), (0, 0), 2)
    points = CANONICAL_FIVE_POINTS * 160 + [220, -40]
    track = FaceTrack(0, [0], [[220, -40, 380, 120]], [points])
    M = alignment_transforms(track, 128)[0]
    crop = crop_face(frame, M, 128)
    out = paste_face(frame, crop, M, face_mask(track, 0, M, 128))
    assert out.shape == frame.shape and psnr(out, frame) >= 40.0


def test_paste_keeps_the_frames_detail_where_the_edit_changed_nothing():
    """A 64² crop of a 200-px face with fine texture, edited in one patch: the frame's own pixels
    survive everywhere else, where pasting the crop itself (overlay) blurs the whole face."""
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    points = CANONICAL_FIVE_POINTS * 200 + 60
    track = FaceTrack(0, [0], [[60, 60, 260, 260]], [points])
    M = alignment_transforms(track, 64)[0]
    mask = face_mask(track, 0, M, 64)
    edited = crop_face(frame, M, 64).astype(np.int16)
    x, y = np.round(CANONICAL_FIVE_POINTS[2] * 64).astype(int)
    edited[y - 6 : y + 6, x - 6 : x + 6] = 0  # a dark patch on the nose
    edited = edited.astype(np.uint8)
    out = paste_face(frame, edited, M, mask)
    inner = cv2.warpAffine(mask, M, (320, 320), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.99
    patch = np.zeros((64, 64), np.float32)
    patch[y - 8 : y + 8, x - 8 : x + 8] = 1
    near_patch = cv2.warpAffine(patch, M, (320, 320), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0
    kept = inner & ~near_patch
    assert kept.sum() > 3000 and np.array_equal(out[kept], frame[kept])
    core = np.zeros((64, 64), np.float32)
    core[y - 5 : y + 5, x - 5 : x + 5] = 1
    core = cv2.warpAffine(core, M, (320, 320), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.99
    assert out[core].mean() < frame[core].mean() - 60  # the edit itself is there
    overlay = paste_face(frame, edited, M, mask, overlay=True)
    assert psnr(overlay[kept], frame[kept]) < 20  # the crop's blur, everywhere under the mask


def test_large_face_crop_is_area_averaged():
    """A face far larger than the crop: the crop equals that of a 4x smaller copy of the frame,
    and fine detail averages out instead of aliasing."""
    rng = np.random.default_rng(4)
    small = cv2.GaussianBlur(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), (0, 0), 1.5)
    big = cv2.resize(small, (512, 512), interpolation=cv2.INTER_NEAREST)
    M_small = align_points(CANONICAL_FIVE_POINTS * 64 + 32) * 64  # scale 1: no shrinking
    M_big = M_small @ np.array([[0.25, 0, -0.375], [0, 0.25, -0.375], [0, 0, 1]])  # big -> small pixels
    diff = np.abs(crop_face(big, M_big, 64).astype(float) - crop_face(small, M_small, 64))
    assert diff[2:-2, 2:-2].max() <= 1.0
    stripes = np.zeros((512, 512, 3), np.uint8)
    stripes[:, ::2] = 255
    assert crop_face(stripes, M_big, 64).std() < 3.0


# --- command ----------------------------------------------------------------------------------


def test_faces_report_writes_tracks_and_preview(shared_clip, tmp_path):
    source = shared_clip("closeup.mp4")
    tracks = faces_report(source, tmp_path / "tracks.json", tmp_path / "preview.mp4")
    assert len(tracks.tracks) == 1
    assert FaceTracks.load(tmp_path / "tracks.json").to_json() == json.loads(json.dumps(tracks.to_json()))
    info = probe_video(tmp_path / "preview.mp4")
    assert (info.width, info.height, info.frame_count) == (512, 512, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.mp4", "tracks.json"]  # no temporaries
