"""What is in front of a face is never painted over (#36): a hand drawn over a real clip is found
by mediapipe's hand landmarker, kept exactly in the paste-back and left out of the local blend."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from ipfacediff.editing.region import without_occluded
from ipfacediff.face import FaceTracks, alignment_transforms, crop_face, face_mask, paste_face, track_faces
from ipfacediff.crops import occlusion_masks
from ipfacediff.occlusion import (
    HAND_IDLE_STRIDE,
    LOOK_WINDOW,
    OCCLUSION_METHOD,
    OcclusionFinder,
    face_behind_occluders,
    occluded_share,
    without_face_behind,
)
from ipfacediff.settings import EditSettings
from ipfacediff.video import iter_frames, write_video

from test_cli import run

FRAMES = 8
SKIN = (224, 172, 140)


def draw_hand(
    frame: np.ndarray, centre: tuple[float, float], scale: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """``frame`` with an open hand drawn over it (a palm and five jointed fingers in a skin tone,
    shaded towards the edges, creases at the joints), and the hand's pixels as a bool mask."""
    palm = np.array([[-0.5, -0.45], [0.5, -0.5], [0.55, 0.1], [0.42, 0.55], [0.0, 0.7], [-0.42, 0.55], [-0.55, 0.05]])
    fingers = []
    for (x, y), length, tilt in zip(
        [(-0.38, -0.45), (-0.13, -0.52), (0.13, -0.52), (0.38, -0.46)],
        [0.75, 0.95, 0.9, 0.7],
        [-0.18, -0.06, 0.06, 0.18],
    ):
        joints = [(x, y)]
        for k in range(3):
            step = length / 3 * (1.0 - 0.1 * k)
            joints.append((joints[-1][0] + step * math.sin(tilt), joints[-1][1] - step * math.cos(tilt)))
        fingers.append((np.array(joints), 0.2))
    joints, turn = [(-0.5, 0.25)], -0.9
    for step in (0.35, 0.3, 0.25):
        turn += 0.15
        joints.append((joints[-1][0] + step * math.sin(turn), joints[-1][1] - step * math.cos(turn)))
    fingers.append((np.array(joints), 0.22))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def place(points):
        return np.asarray(points) @ rotation.T * scale + centre

    shape = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillPoly(shape, [np.round(place(palm) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    creases = np.zeros_like(shape)
    for joints, width in fingers:
        points = np.round(place(joints)).astype(int)
        for a, b in zip(points[:-1], points[1:]):
            cv2.line(shape, tuple(a), tuple(b), 255, max(2, int(width * scale)), cv2.LINE_AA)
        cv2.circle(shape, tuple(points[-1]), max(1, int(width * scale / 2)), 255, -1, cv2.LINE_AA)
        across = np.array([math.cos(angle), math.sin(angle)]) * width * scale * 0.45
        for p in place(joints)[1:-1]:
            cv2.line(creases, tuple(np.round(p - across).astype(int)), tuple(np.round(p + across).astype(int)), 255, 1)
    depth = cv2.distanceTransform((shape > 127).astype(np.uint8), cv2.DIST_L2, 5)
    colour = (0.7 + 0.3 * np.clip(depth / (0.08 * scale), 0, 1))[..., None] * np.array(SKIN, np.float32)
    colour *= 1 - 0.25 * creases[..., None] / 255.0
    alpha = shape[..., None] / 255.0
    return (frame * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8), shape > 127


@pytest.fixture(scope="module")
def occluded(shared_clip, tmp_path_factory):
    """closeup.mp4's first frames with a hand passing over the face: the clip, its face tracks
    (found on the clean frames, as a track file would give them), the frames and the hand masks."""
    clean = []
    for frame in iter_frames(shared_clip("closeup.mp4")):
        clean.append(frame)
        if len(clean) == FRAMES:
            break
    tracks = track_faces(clean, fps=10.0)
    assert len(tracks.tracks) == 1, "closeup.mp4 shows one face"
    drawn = [draw_hand(f, (150 + 7 * i, 320), 140, 0.1 * (i % 5 - 2)) for i, f in enumerate(clean)]
    folder = tmp_path_factory.mktemp("occluded")
    write_video(folder / "hand.mp4", [frame for frame, _ in drawn], 10.0)
    tracks.save(folder / "hand.tracks.json")
    return folder, tracks, np.stack(clean), np.stack([f for f, _ in drawn]), np.stack([h for _, h in drawn])


def crop_transforms(tracks: FaceTracks, size: int) -> list[np.ndarray]:
    by_frame = alignment_transforms(tracks.tracks[0], size)
    return [by_frame[f] for f in sorted(by_frame)]


def test_a_hand_over_the_face_is_covered_and_a_clean_face_is_not(occluded):
    _, tracks, clean, frames, hands = occluded
    transforms = crop_transforms(tracks, 256)
    masks = occlusion_masks(frames, transforms, 256)
    for mask, hand, M in zip(masks, hands, transforms):
        hand_in_crop = cv2.warpAffine(hand.astype(np.uint8), M, (256, 256), flags=cv2.INTER_NEAREST) > 0
        assert (mask[hand_in_crop] == 1.0).mean() > 0.99
    assert not occlusion_masks(clean, transforms, 256).any()


def test_a_hand_that_comes_in_later_is_covered_from_its_first_frame(occluded):
    """Frames without a hand near run one of the two hand looks each, in turn: a hand that comes in
    after a few clean frames is still covered in every frame it is in."""
    _, tracks, clean, frames, hands = occluded
    transforms = crop_transforms(tracks, 256)
    late = np.concatenate([clean[:3], frames[3:]])
    masks = occlusion_masks(late, transforms, 256)
    for mask, hand, M in list(zip(masks, hands, transforms))[3:]:
        hand_in_crop = cv2.warpAffine(hand.astype(np.uint8), M, (256, 256), flags=cv2.INTER_NEAREST) > 0
        assert (mask[hand_in_crop] == 1.0).mean() > 0.99


class CountingFinder(OcclusionFinder):
    """An OcclusionFinder that keeps the frame (``frame``, set by the test) of each run of the hand landmarker."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[int] = []
        self.frame = -1

    def _run(self, key, static, region):
        self.runs.append(self.frame)
        return super()._run(key, static, region)


def test_a_still_face_is_not_looked_at_again_until_a_hand_comes_in(occluded):
    """While nothing moves in front of a face the palm detector is not run on it frame after frame
    (it would find what it found in the same pixels); a hand that comes in is found from its first
    frame, here in the clip's last frames, which no later look sends a look back to."""
    _, tracks, clean, frames, hands = occluded
    transforms = crop_transforms(tracks, 256)
    still = [clean[0]] * 5 + list(frames[5:])
    found: dict = {}
    with CountingFinder() as finder:
        for i, (frame, M) in enumerate(zip(still, [transforms[0]] * 5 + transforms[5:])):
            finder.frame = i
            finder.look(found, i, np.ascontiguousarray(frame), M, 256)
    assert len([f for f in finder.runs if f < 5]) == 2, finder.runs  # one run of each look
    assert all(found[f] for f in range(5, FRAMES)), {f: len(h) for f, h in found.items()}
    assert not any(found[f] for f in range(5))


def test_a_face_with_no_hand_near_is_looked_at_every_few_frames(occluded):
    """While no hand is near, the palm detector runs on every HAND_IDLE_STRIDE-th frame of a face;
    a hand that comes in on a frame it skips is found there all the same, by the look back from
    the next look that finds it."""
    _, tracks, clean, frames, _ = occluded
    transforms = crop_transforms(tracks, 256)
    comes_in = HAND_IDLE_STRIDE + 1
    late = np.concatenate([clean[:comes_in], frames[comes_in:]])
    found: dict = {}
    with CountingFinder() as finder:
        for i, (frame, M) in enumerate(zip(late, transforms)):
            finder.frame = i
            finder.look(found, i, np.ascontiguousarray(frame), M, 256)
    assert {f for f in finder.runs if f <= comes_in} == set(range(0, comes_in, HAND_IDLE_STRIDE)), finder.runs
    assert all(found[f] for f in range(comes_in, FRAMES)), {f: len(h) for f, h in found.items()}
    assert not any(found[f] for f in range(comes_in))


def test_a_hand_found_in_every_other_frame_is_found_wherever_a_look_finds_it(tmp_path):
    """Person 1003's drawn hand covers the face in all 12 frames and the landmarker finds it in
    every other frame or so. Looking at every other frame while no hand is near then misses it
    until late, with the frames it would be found in skipped. The look back from the first one
    found goes over the gaps, so each frame where either look alone finds a hand has one."""
    from faceworld import render_clip

    clip = render_clip(1003, seed=1003, frames=12, size=128, fps=12.0).with_occluders(["hand"])
    frames = np.stack(list(iter_frames(write_video(tmp_path / "hand.mp4", iter(clip), clip.fps))))
    transforms = crop_transforms(clip.tracks, 64)
    alone = set()
    for i, (frame, M) in enumerate(zip(frames, transforms)):
        with OcclusionFinder() as finder:
            if finder.hands(frame, M, 64):
                alone.add(i)
    found: dict = {}
    with OcclusionFinder() as finder:
        for i, (frame, M) in enumerate(zip(frames, transforms)):
            finder.look(found, i, frame, M, 64)
    assert len(alone) >= 4 and min(alone) < 6, alone  # found late: the clip shows what is tested
    assert alone <= {f for f, hands in found.items() if hands}, (alone, {f: len(h) for f, h in found.items()})


def test_the_image_mode_landmarker_is_handed_on_and_keeps_nothing_between_images(occluded):
    """A finder's image-mode landmarker goes on to the next finder of the process, which then
    finds in a frame exactly what a new one would: the hands of the frames between leave nothing."""
    from ipfacediff.occlusion import _context_square

    _, tracks, _, frames, _ = occluded
    squares = [_context_square(f, M, 256) for f, M in zip(frames, crop_transforms(tracks, 256))]
    with OcclusionFinder() as first:
        before = first._run(0, True, squares[4])
        used = first._graph(0, True)
        for square in squares:
            first._run(0, True, square)
    with OcclusionFinder() as second:
        assert second._graph(0, True) is used
        after = second._run(0, True, squares[4])
    assert before and len(after) == len(before)
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


def test_a_small_still_face_is_looked_at_once():
    """A face so small that both hand looks see its square unshrunk: one look that finds no hand
    stands for both while the square stays as it was."""
    from faceworld import render_clip

    clip = render_clip(1000, seed=1000, frames=2, size=128, fps=12.0)
    frame, M = clip.array()[0], crop_transforms(clip.tracks, 64)[0]
    found: dict = {}
    with CountingFinder() as finder:
        for i in range(6):
            finder.frame = i
            finder.look(found, i, frame, M, 64)
    assert finder.runs == [0] and not any(found.values())


def synthetic_edit(crop: np.ndarray) -> np.ndarray:
    """A stand-in for an edit that changes every pixel by 60 levels: a fine checkerboard up and down
    (no low-frequency tint, which the paste-back's seam correction would take out near the seam)."""
    y, x = np.indices(crop.shape[:2])
    signs = np.where((x // 4 + y // 4) % 2, 60, -60)[..., None]
    return np.clip(crop.astype(int) + signs, 0, 255).astype(np.uint8)


def test_the_paste_back_keeps_the_hand_exactly_and_edits_the_face_around_it(occluded):
    _, tracks, _, frames, hands = occluded
    size, track = 256, tracks.tracks[0]
    transforms = crop_transforms(tracks, size)
    masks = occlusion_masks(frames, transforms, size)
    for index in (0, FRAMES - 1):
        M, frame = transforms[index], frames[index]
        edit = synthetic_edit(crop_face(frame, M, size))
        mask = face_mask(track, index, M, size)
        on = paste_face(frame, edit, M, mask, occlusion=masks[index])
        off = paste_face(frame, edit, M, mask)
        inside = cv2.warpAffine(mask, cv2.invertAffineTransform(M), frame.shape[1::-1]) > 0.99
        hand = hands[index] & inside
        assert hand.sum() > 1000
        assert (on[hand] == frame[hand]).all()
        changed = np.abs(off.astype(int) - frame).max(-1) > 8
        assert changed[hand].mean() > 0.9
        face = inside & ~cv2.dilate(hands[index].astype(np.uint8), np.ones((61, 61), np.uint8)).astype(bool)
        assert (np.abs(on.astype(int) - frame).max(-1) > 8)[face].mean() > 0.6  # most of the rest of the face is edited
        assert 0.05 < occluded_share(masks[index], mask) < 0.8


def test_a_token_counts_as_seen_by_the_share_of_it_left_seen():
    blend = torch_ones(2, 8)
    covered = np.zeros((2, 64, 64), np.float32)
    covered[0, :32] = 1.0  # the top half of the first frame
    covered[1, :, :4] = 1.0  # half of the first token column of the second
    out = without_occluded(blend, covered).numpy()
    assert (out[0, 0, :4] == 0).all() and (out[0, 0, 4:] == 1).all()
    assert np.allclose(out[1, 0, :, 0], 0.5) and (out[1, 0, :, 1:] == 1).all()


def torch_ones(count: int, side: int):
    import torch

    return torch.ones(count, 1, side, side)


def test_the_edit_is_given_the_face_behind_a_hand_and_pastes_only_its_own_change():
    """A hand covers a square of frames 2-3 of a face seen whole in the others, a microphone a
    corner of every frame: the edit is given the face itself under the hand (its other frames'),
    the microphone as it is; the fill is taken back out of the edited crops, so what the paste-back
    adds under the hand is the edit's change alone, not the face drawn over the hand."""
    rng = np.random.default_rng(0)
    face = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
    crops = np.repeat(face[None], 6, axis=0)
    crops[2:4, 8:20, 8:20] = (230, 190, 160)  # the hand
    crops[:, 26:, 26:] = (90, 90, 90)  # the microphone, in front all the time
    occlusion = np.zeros((6, 16, 16), np.float32)  # masks at half the crop's side, as stored
    occlusion[2:4, 3:11, 3:11] = 1.0
    occlusion[:, 13:, 13:] = 1.0
    before = crops.copy()
    filled = face_behind_occluders(crops, occlusion)
    assert np.array_equal(crops, before)  # the crops themselves are left alone
    assert np.array_equal(filled[2:4, 9:19, 9:19], np.repeat(face[None, 9:19, 9:19], 2, axis=0))
    assert np.array_equal(filled[:, 27:, 27:], crops[:, 27:, 27:])  # no frame shows the face there
    assert np.array_equal(filled[[0, 1, 4, 5], :24, :24], crops[[0, 1, 4, 5], :24, :24])
    edited = np.clip(filled.astype(np.int16) + 10, 0, 255).astype(np.uint8)  # the edit brightens all
    without_face_behind(edited, crops, filled, occlusion)
    assert np.array_equal(edited[2, 9:19, 9:19], np.full((10, 10, 3), (240, 200, 170), np.uint8))
    assert np.array_equal(edited[[0, 5]], np.clip(crops[[0, 5]].astype(np.int16) + 10, 0, 255))


def test_what_no_frame_shows_is_painted_once_a_run_and_held_still():
    """A microphone in front of a corner of every frame, a hand over a square of two: the hand's
    pixels come from the face's other frames; the microphone's, which none shows, are painted
    once for each run of at most 2 LOOK_WINDOW + 1 frames, and every frame of a run takes the
    same painting."""
    rng = np.random.default_rng(0)
    face = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
    count = 2 * LOOK_WINDOW + 9
    crops = np.repeat(face[None], count, axis=0)
    crops[2:4, 8:20, 8:20] = (230, 190, 160)  # the hand
    crops[:, 26:, 26:] = (90, 90, 90)  # the microphone
    occlusion = np.zeros((count, 16, 16), np.float32)
    occlusion[2:4, 3:11, 3:11] = 1.0
    occlusion[:, 13:, 13:] = 1.0
    calls = []

    def paint(crop: np.ndarray, region: np.ndarray) -> np.ndarray:
        calls.append(region.copy())
        painted = crop.copy()
        painted[region > 0] = (10 * len(calls), 0, 0)
        return painted

    filled = face_behind_occluders(crops, occlusion, paint=paint)
    assert len(calls) == 2  # frames 0-32, then 33-40
    assert all((region[27:, 27:] == 1).all() and not region[:24].any() for region in calls)
    assert np.array_equal(filled[2:4, 9:19, 9:19], np.repeat(face[None, 9:19, 9:19], 2, axis=0))
    assert (filled[: 2 * LOOK_WINDOW + 1, 27:, 27:] == (10, 0, 0)).all()
    assert (filled[2 * LOOK_WINDOW + 1 :, 27:, 27:] == (20, 0, 0)).all()
    assert np.array_equal(filled[:, :24, :24][[0, 1, 4, 5]], crops[[0, 1, 4, 5], :24, :24])
    assert np.array_equal(face_behind_occluders(crops, occlusion)[:, 27:, 27:], crops[:, 27:, 27:])  # no painter


def test_the_identity_model_paints_the_face_behind_a_held_microphone():
    """FaceWorld's microphone held at the mouth: ε1's painting of what it covers is nearer the
    face behind it (the clip rendered without it) than the microphone is; every pixel outside the
    region is the crop's own, and the same seed paints the same."""
    from faceworld import render_clip

    from ipfacediff.face import crop_face
    from ipfacediff.job import load_pipeline

    plain = render_clip(1002, seed=1002, frames=1, size=128, fps=12.0)
    clip = plain.with_occluders(["microphone"])
    M = crop_transforms(clip.tracks, 64)[0]
    crop, behind = crop_face(clip.array()[0], M, 64), crop_face(plain.array()[0], M, 64)
    region = cv2.warpAffine(clip.occluder_mask(0).astype(np.float32), M, (64, 64))
    pipe = load_pipeline(None, device="cpu")
    with torch.inference_mode():
        painted = pipe.paint_hidden(crop, region, steps=8, seed=3)
        again = pipe.paint_hidden(crop, region, steps=8, seed=3)
    assert np.array_equal(painted, again)
    assert np.array_equal(painted[region == 0], crop[region == 0])
    solid = region > 0.99
    assert solid.sum() > 50
    error = lambda x: float(np.abs(x[solid].astype(int) - behind[solid]).mean())  # noqa: E731
    assert error(painted) < 0.5 * error(crop), (error(painted), error(crop))


def test_a_fully_covered_face_is_pasted_back_as_it_was(tiny_pipe, one_thread):
    """The pipeline edits the face it is given (the face behind, filled in); where the mask covers
    all of it, the paste-back keeps every pixel of the frame."""
    from conftest import moving_texture

    frames = moving_texture(4)
    settings = EditSettings(prompt="a face with eyeglasses", steps=3, adapters="none", keyframes=2)
    covered = np.ones((4, 64, 64), np.float32)
    edited = tiny_pipe(frames, settings, occlusion=covered).frames
    assert not np.array_equal(edited, frames)
    M = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    for frame, crop, mask in zip(frames, edited, covered):
        out = paste_face(frame, crop, M, np.ones((64, 64), np.float32), occlusion=mask)
        assert np.array_equal(out, frame)


def test_frames_whose_edit_region_is_hidden_are_never_keyframes(tiny_pipe, one_thread):
    """A board hides frames 2-5 of 8 whole: the keyframes, drawn anew every step, come from the
    other frames, whose faces are seen (the frames after the board take their edit from them)."""
    from conftest import moving_texture

    from ipfacediff.editing.region import seen_share

    frames = moving_texture(8)
    covered = np.zeros((8, 64, 64), np.float32)
    covered[2:6] = 1.0
    settings = EditSettings(prompt="a face with eyeglasses", steps=6, adapters="none", keyframes=2)
    for local_blend in (True, False):
        result = tiny_pipe(frames, replace(settings, local_blend=local_blend), occlusion=covered)
        drawn = {k for step in result.keyframes_per_step for k in step}
        assert drawn and not drawn & {2, 3, 4, 5}, drawn
    free = {k for step in tiny_pipe(frames, settings).keyframes_per_step for k in step}
    assert free & {2, 3, 4, 5}  # without the board they are drawn too
    region = torch.zeros(2, 1, 8, 8)
    region[:, :, 2:4, :] = 1.0  # the eye band
    hand = np.zeros((2, 64, 64), np.float32)
    hand[1, 16:32, :32] = 1.0  # the left half of frame 1's eye band
    assert np.allclose(seen_share(region, hand), [1.0, 0.5])
    assert np.allclose(seen_share(None, hand), [1.0, 1 - 0.125])


def test_the_cli_edit_keeps_the_hand_with_occlusion_and_paints_it_without(occluded, tiny_dir, tmp_path, capsys):
    folder, tracks, _, frames, hands = occluded
    common = ["--prompt", "a face with eyeglasses", "--model", str(tiny_dir), "--resolution", "64", "--steps", "3"]
    common += ["--tracks", str(folder / "hand.tracks.json"), "--no-local-blend", "--cache-dir", str(tmp_path / "c")]
    diffs = {}
    for flag in ("--occlusion", "--no-occlusion"):
        out = tmp_path / f"{flag.strip('-')}.mp4"
        code, _, stderr = run(["edit", str(folder / "hand.mp4"), "-o", str(out), *common, flag], capsys)
        assert code == 0, stderr
        edited = np.stack(list(iter_frames(out)))
        source = np.stack(list(iter_frames(folder / "hand.mp4")))
        report = json.loads(out.with_name(out.stem + ".run.json").read_text())
        diffs[flag] = np.abs(edited.astype(int) - source).max(-1)[hands]
        assert report["settings"]["occlusion"] is (flag == "--occlusion")
        face = report["faces"][0]
        if flag == "--occlusion":
            assert face["occlusion"]["method"] == OCCLUSION_METHOD and face["occlusion"]["frames_occluded"] == FRAMES
            assert 0 < face["occlusion"]["frames_with_hands"] <= FRAMES
            assert len(face["occlusion"]["share"]) == FRAMES and min(face["occlusion"]["share"]) > 0.05
            assert "occlusion" in report["seconds"]
        else:
            assert face["occlusion"] is None
    # Re-encoding alone moves a pixel by a few levels; the edit painted over the hand moves it far more.
    assert (diffs["--occlusion"] > 8).mean() < 0.02
    assert (diffs["--no-occlusion"] > 8).mean() > 5 * max(0.01, (diffs["--occlusion"] > 8).mean())


def test_the_run_report_says_what_found_a_cup(tiny_dir, tmp_path, capsys):
    """A cup has no hand: .run.json says the face was covered in frames the landmarker found
    nothing in (the face's own look found it)."""
    from faceworld import HELD_OUT_IDS, render_clip

    clip = render_clip(HELD_OUT_IDS[1], seed=HELD_OUT_IDS[1], frames=12, size=128, fps=12.0).with_occluders(["cup"])
    video = write_video(tmp_path / "cup.mp4", iter(clip), clip.fps)
    tracks = clip.tracks.save(tmp_path / "cup.tracks.json")
    out = tmp_path / "out.mp4"
    argv = ["edit", str(video), "-o", str(out), "--prompt", "a face with eyeglasses", "--model", str(tiny_dir)]
    argv += ["--resolution", "64", "--steps", "2", "--tracks", str(tracks), "--cache-dir", str(tmp_path / "c")]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    occlusion = json.loads(out.with_name("out.run.json").read_text())["faces"][0]["occlusion"]
    assert occlusion["frames_occluded"] >= 3 and occlusion["frames_with_hands"] == 0


def test_the_setting_round_trips():
    settings = EditSettings(prompt="x", occlusion=False)
    assert EditSettings.from_mapping(settings.to_dict()) == settings
    assert EditSettings(prompt="x").occlusion is True


def test_the_preview_tints_the_hand_red(occluded, tmp_path):
    from ipfacediff.face import write_preview

    _, tracks, clean, frames, hands = occluded
    shown = {}
    for name, source in (("hand", frames), ("clean", clean)):
        write_preview(tmp_path / f"{name}.mp4", source, tracks, 10.0)
        shown[name] = np.stack(list(iter_frames(tmp_path / f"{name}.mp4"))).astype(int)
    redder = (shown["hand"][..., 0] - shown["hand"][..., 1]) - (frames[..., 0].astype(int) - frames[..., 1])
    assert np.median(redder[hands]) > 40
    unchanged = (shown["clean"][..., 0] - shown["clean"][..., 1]) - (clean[..., 0].astype(int) - clean[..., 1])
    assert np.median(unchanged[hands]) < 10  # where the hand would be: only the face's green tint


def test_the_preview_tints_what_the_look_finds_too(tmp_path, capsys):
    """A cup raised to the mouth has no hand: ``faces --preview`` shows the mask the edit uses (the
    face's own look finds the cup), not the hand landmarker's alone; a clean clip shows none."""
    from faceworld import HELD_OUT_IDS, render_clip

    clip = render_clip(HELD_OUT_IDS[1], seed=HELD_OUT_IDS[1], frames=12, size=128, fps=12.0)
    shown, inputs = {}, {}
    for name, occluders in (("cup", ["cup"]), ("clean", [])):
        video = write_video(tmp_path / f"{name}-in.mp4", iter(clip.with_occluders(occluders)), clip.fps)
        code, stdout, stderr = run(["faces", str(video), "--preview", str(tmp_path / f"{name}.mp4")], capsys)
        assert code == 0 and "face 0: frames 0-11" in stdout, stderr
        shown[name] = np.stack(list(iter_frames(tmp_path / f"{name}.mp4"))).astype(int)
        inputs[name] = np.stack(list(iter_frames(video))).astype(int)
    cup = clip.with_occluders(["cup"]).occluder_masks() >= 252
    face = np.stack([face_mask(clip.tracks.tracks[0], i, np.eye(2, 3), 128) for i in range(12)]) > 0.5
    redness = {n: (shown[n][..., 0] - shown[n][..., 1]) - (inputs[n][..., 0] - inputs[n][..., 1]) for n in shown}
    assert (cup & face).sum() > 200
    assert np.median(redness["cup"][cup & face]) > 40
    assert np.median(redness["clean"][cup & face]) < 10


def test_clean_faces_get_no_mask(shared_clip):
    """Nothing in front of the face, nothing masked: a real clip other than the fixture's, and
    FaceWorld people of the held-out split whose glasses, hats and beards belong to the face."""
    from faceworld.scene import random_attributes, render_clip

    jogger = [frame for _, frame in zip(range(FRAMES), iter_frames(shared_clip("jogger.mp4")))]
    clips = [(jogger, track_faces(jogger, fps=10.0), 512)]
    rng = np.random.default_rng(36)
    for seed, identity in enumerate((1003, 1016)):
        clip = render_clip(identity, random_attributes(rng), seed=seed, frames=4, size=256)
        clips.append((list(clip), clip.tracks, 256))
    for frames, tracks, size in clips:
        transforms = crop_transforms(tracks, size)
        assert len(transforms) == len(frames)
        masks = occlusion_masks(frames, transforms, size)
        assert masks.shape == (len(frames), size, size) and not masks.any()


def changed_share_under_paste(frames, masks, transforms, track, coverage) -> float:
    """The share of an occluder's solid pixels (coverage ≥ 0.99) that the synthetic edit, pasted
    with ``masks``, changes by more than 8 levels."""
    size = masks.shape[1]
    changed = []
    for i, (frame, M) in enumerate(zip(frames, transforms)):
        edit = synthetic_edit(crop_face(frame, M, size))
        out = paste_face(frame, edit, M, face_mask(track, track.frames[i], M, size), occlusion=masks[i])
        changed.append((np.abs(out.astype(int) - frame).max(-1) > 8)[coverage[i] >= 0.99])
    return float(np.concatenate(changed).mean())


def test_a_faceworld_hand_is_kept_in_the_frames_the_landmarker_misses(tmp_path):
    """A drawn cartoon hand passing over a FaceWorld face, as the edit reads it back from a video:
    the landmarker alone misses it in some frames and misplaces the thumb in others; the face's
    track (hands carried over gaps, what differs from the face's own look near a hand) keeps it."""
    from faceworld import render_clip

    from ipfacediff.occlusion import OcclusionFinder

    clip = render_clip(1000, seed=1000, frames=12, size=128, fps=12.0).with_occluders(["hand"])
    frames = np.stack(list(iter_frames(write_video(tmp_path / "hand.mp4", iter(clip), clip.fps))))
    track, size = clip.tracks.tracks[0], 64
    transforms = crop_transforms(clip.tracks, size)
    coverage = clip.occluder_masks()
    with OcclusionFinder() as finder:
        alone = np.stack([finder.mask(f, M, size) for f, M in zip(frames, transforms)])
    masks = occlusion_masks(frames, transforms, size)
    assert changed_share_under_paste(frames, alone, transforms, track, coverage) > 0.05
    assert changed_share_under_paste(frames, masks, transforms, track, coverage) <= 0.01
    clean = np.stack(list(iter_frames(write_video(tmp_path / "clean.mp4", iter(clip.with_occluders([])), clip.fps))))
    assert not occlusion_masks(clean, transforms, size).any()


@pytest.mark.parametrize("kind", ["hand", "cup"])
def test_a_faceworld_occluder_composited_on_a_real_clip_is_kept(shared_clip, kind):
    """A cartoon hand (which the landmarker finds in some frames) and a cup raised to the mouth
    (which it never finds) drawn over jogger.mp4's face along its own track."""
    from faceworld import occlude_frames

    from ipfacediff.face import _invert

    frames = np.stack([f for _, f in zip(range(12), iter_frames(shared_clip("jogger.mp4")))])
    tracks = track_faces(frames, fps=10.0)
    face = max(tracks.tracks, key=lambda t: t.median_area)
    to_frame = {f: _invert(M) for f, M in alignment_transforms(face, 1).items()}
    composite, coverage = occlude_frames(frames, to_frame, [kind])
    by_frame = alignment_transforms(face, 256)
    order = sorted(by_frame)
    transforms = [by_frame[f] for f in order]
    masks = occlusion_masks(composite[order], transforms, 256, face)
    assert coverage[order].max() == 1.0
    assert changed_share_under_paste(composite[order], masks, transforms, face, coverage[order]) <= 0.01


def test_hands_are_carried_over_short_gaps_only():
    from ipfacediff.occlusion import HAND_GAP, fill_hand_gaps

    hand = np.zeros((21, 2))
    hands = {0: [hand], 1: [], 2: [], 3: [hand + 30], 4: []}
    hands |= dict.fromkeys(range(5, 5 + HAND_GAP + 1), [])
    hands[5 + HAND_GAP + 1] = [hand]
    filled = fill_hand_gaps(hands)
    assert np.allclose(filled[1][0], 10) and np.allclose(filled[2][0], 20)
    assert all(filled[f] == [] for f in range(4, 5 + HAND_GAP + 1))
    assert hands[1] == []  # the input is left as it was


def test_a_faceworld_cup_is_kept_and_turning_heads_are_not_marked(tmp_path):
    """A cup raised to the mouth and lowered again: no hand, so only the face's own look finds it.
    Clean FaceWorld people who turn their heads and change expression over 24 frames (their face's
    edge moves against hair and backdrop) get no mask."""
    from faceworld import HELD_OUT_IDS, render_clip
    from faceworld.scene import random_attributes

    clip = render_clip(HELD_OUT_IDS[1], seed=HELD_OUT_IDS[1], frames=12, size=128, fps=12.0).with_occluders(["cup"])
    frames = np.stack(list(iter_frames(write_video(tmp_path / "cup.mp4", iter(clip), clip.fps))))
    track, transforms = clip.tracks.tracks[0], crop_transforms(clip.tracks, 64)
    masks = occlusion_masks(frames, transforms, 64, track)
    no_look = np.zeros_like(masks)
    assert changed_share_under_paste(frames, no_look, transforms, track, clip.occluder_masks()) > 0.2
    assert changed_share_under_paste(frames, masks, transforms, track, clip.occluder_masks()) <= 0.01
    rng = np.random.default_rng(36)
    for person in (1006, 1007):
        clean = render_clip(person, random_attributes(rng), seed=person, frames=24, size=128, fps=12.0)
        frames = np.stack(list(iter_frames(write_video(tmp_path / f"{person}.mp4", iter(clean), clean.fps))))
        masks = occlusion_masks(frames, crop_transforms(clean.tracks, 64), 64, clean.tracks.tracks[0])
        assert not masks.any()


def test_the_look_median_leaves_out_what_was_covered():
    from ipfacediff.occlusion import _median_of_seen

    rng = np.random.default_rng(36)
    window = rng.random((9, 8, 8, 3)).astype(np.float32) * 255
    window[rng.random(window.shape[:3]) < 0.5] = np.nan
    window[:, 0, 0] = np.nan  # covered in every frame: no median
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected = np.nanmedian(window, axis=0)
    np.testing.assert_array_equal(_median_of_seen(window), expected)


def test_the_paste_back_keeps_a_rim_and_the_colour_blocks_of_what_is_in_front():
    """The masks fall short of an occluder's edge by up to a pixel, and a written frame stores one
    colour for each 2x2 block of pixels: the pixel beside the mask is kept, and so is every block
    with a kept pixel in it; the face right beside such a block is edited."""
    from ipfacediff.face import OCCLUSION_GROW_PX

    assert OCCLUSION_GROW_PX == 1  # the frame pixels below are counted for one
    frame = np.full((96, 96, 3), 120, np.uint8)
    M = np.array([[1.0, 0, 16], [0, 1.0, 16]])  # frame pixel (x, y) is crop pixel (x + 16, y + 16)
    covered = np.zeros((128, 128), np.float32)
    covered[42:78, 42:78] = 1.0  # frame pixels 26-61; with the rim 25-62; with their blocks 24-63
    out = paste_face(frame, np.full((128, 128, 3), 200, np.uint8), M, np.ones((128, 128), np.float32),
                     match_colour=False, occlusion=covered)  # fmt: skip
    changed = np.abs(out.astype(int) - frame).max(-1) > 0
    assert not changed[24:64, 26:62].any() and not changed[26:62, 24:64].any()  # the rim's corners are round
    assert (
        changed[23, 24:64].all() and changed[64, 24:64].all() and changed[24:64, 23].all() and changed[24:64, 64].all()
    )
    half = covered * 0.5  # a mask's fading edge keeps its share and its rim, and no block more
    out = paste_face(frame, np.full((128, 128, 3), 200, np.uint8), M, np.ones((128, 128), np.float32),
                     match_colour=False, occlusion=half)  # fmt: skip
    assert (out[25:63, 26:62] == 160).all() and (out[24, 24:64] == 200).all() and (out[63, 24:64] == 200).all()


def test_a_blink_after_a_hand_has_passed_stays_editable(tmp_path):
    """A FaceWorld hand passes the face and leaves it while the person blinks and smiles: the eye
    and mouth then differ from the face's look (taken while the hand was there too), inside where
    the hand was a few frames before. Only what touches the hand, or is as large as one, is
    covered: every covered region in the crop reaches the true hand."""
    from faceworld import render_clip

    clip = render_clip(1000, seed=1000, frames=12, size=128, fps=12.0).with_occluders(["hand"])
    frames = np.stack(list(iter_frames(write_video(tmp_path / "hand.mp4", iter(clip), clip.fps))))
    transforms, size = crop_transforms(clip.tracks, 64), 64
    masks = occlusion_masks(frames, transforms, size)
    coverage = clip.occluder_masks()
    apart = []
    for mask, cover, M in zip(masks, coverage, transforms):
        hand = cv2.warpAffine(cover.astype(np.float32), M, (size, size)) > 0.5
        count, labels = cv2.connectedComponents((mask > 0.5).astype(np.uint8), connectivity=8)
        reach = cv2.dilate(hand.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        apart.append(sum(not reach[labels == k].any() for k in range(1, count)))
    assert masks[:9].any(axis=(1, 2)).all()  # the hand is covered while it is there
    assert apart == [0] * len(masks), apart
