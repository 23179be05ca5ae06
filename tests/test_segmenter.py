"""The occluder segmenter: what is held still in front of a face (a microphone at the mouth), which
the face's own look cannot find, found by the model set's segmenter on the faces of its world."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from ipfacediff.crops import occlusion_masks
from ipfacediff.domain import ModelCard
from ipfacediff.job import SHIPPED_MODELS
from ipfacediff.models.segmenter import OccluderSegmenter, face_regions, load_occluder_segmenter
from ipfacediff.occlusion import OCCLUSION_METHOD
from ipfacediff.video import iter_frames, write_video

from test_cli import run
from test_occlusion import FRAMES, changed_share_under_paste, crop_transforms


@pytest.fixture(scope="module")
def shipped():
    card = ModelCard.read(SHIPPED_MODELS)
    return load_occluder_segmenter(card.occluder_segmenter)


def faceworld_clip(tmp_path, person: int, occluders=(), frames: int = 12, attributes=None):
    """A held-out FaceWorld person's clip as an edit reads it back: (clip, decoded frames)."""
    from faceworld import render_clip

    clip = render_clip(person, attributes, seed=person, frames=frames, size=128, fps=12.0).with_occluders(occluders)
    video = write_video(tmp_path / f"{person}-{'-'.join(occluders) or 'clean'}.mp4", iter(clip), clip.fps)
    return clip, np.stack(list(iter_frames(video))), video


def test_a_piece_counts_where_it_reaches_into_the_face():
    face = np.zeros((1, 32, 32), np.float32)
    face[0, 8:28, 8:24] = 1
    marked = np.zeros((1, 32, 32), bool)
    marked[0, 20:30, 12:18] = True  # a microphone rising into the face from below
    marked[0, 0:4, 0:4] = True  # the backdrop's corner
    marked[0, 10, 10] = True  # a speck on the face
    kept = face_regions(marked, face, least=8)
    assert kept[0, 20:30, 12:18].all()  # the whole piece, its part below the face too
    assert not kept[0, 0:4, 0:4].any() and kept[0, 10, 10] == 0


def test_the_segmenter_saves_and_loads_as_a_diffusers_model(tmp_path):
    model = OccluderSegmenter(side=32, channels=(8, 16), threshold=0.3, min_share=0.01)
    model.save_pretrained(tmp_path / "seg")
    loaded = load_occluder_segmenter(tmp_path / "seg")
    assert loaded.config.side == 32 and loaded.config.threshold == 0.3 and not loaded.training
    crops = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)  # resized to its side
    assert np.allclose(model.eval().probability(crops), loaded.probability(crops), atol=1e-6)
    assert loaded.probability(crops).shape == (3, 32, 32)


def test_the_shipped_segmenter_finds_a_microphone_held_at_the_mouth(shipped, tmp_path):
    """The microphone stays at the mouth the whole clip: part of the face's own look, so the look
    alone leaves it to the edit; with the embedded model's segmenter it is kept."""
    from faceworld import HELD_OUT_IDS

    clip, frames, _ = faceworld_clip(tmp_path, HELD_OUT_IDS[0], ["microphone"])
    track, transforms = clip.tracks.tracks[0], crop_transforms(clip.tracks, 64)
    coverage = clip.occluder_masks() / 255.0
    without = occlusion_masks(frames, transforms, 64, track)
    with_segmenter = occlusion_masks(frames, transforms, 64, track, shipped)
    assert changed_share_under_paste(frames, without, transforms, track, coverage) > 0.1
    assert changed_share_under_paste(frames, with_segmenter, transforms, track, coverage) <= 0.01


def test_the_shipped_segmenter_marks_no_clean_face(shipped, tmp_path):
    """Held-out people with their own glasses, hats and beards (which belong to the face), turning
    and talking over 24 frames: the segmenter adds nothing to their masks. 1001 turns her face
    from a red backdrop and 1018's light hair falls over a dark forehead: the segmenter marks some
    of both, which reaches only the face's outline (``inner_margin``), or one frame alone
    (:func:`~ipfacediff.occlusion.held_over_time`)."""
    from faceworld.scene import random_attributes

    rng = np.random.default_rng(36)
    for person, attributes in (
        (1001, None),
        (1018, None),
        (1006, random_attributes(rng)),
        (1007, random_attributes(rng)),
    ):
        clip, frames, _ = faceworld_clip(tmp_path, person, frames=24, attributes=attributes)
        track, transforms = clip.tracks.tracks[0], crop_transforms(clip.tracks, 64)
        without = occlusion_masks(frames, transforms, 64, track)
        with_segmenter = occlusion_masks(frames, transforms, 64, track, shipped)
        added = np.count_nonzero((with_segmenter > without).any(axis=(1, 2)))
        assert added == 0, f"person {person}: the segmenter adds to {added} frames"


def test_a_board_the_segmenter_marks_in_part_leaves_the_clean_frames_unmarked(shipped, tmp_path):
    """A board passes across the whole face in half the clip's frames and the segmenter marks only
    part of it there: what it marks stays out of the face's look, so the median of a clean frame's
    pixels is the face's and not halfway to the board (which marked the eyes and mouth of the
    frames before and after it, where the edit was then left out)."""
    from ipfacediff.face import face_mask
    from ipfacediff.occlusion import occluded_share

    clip, frames, _ = faceworld_clip(tmp_path, 1000, ["object"])
    track, transforms = clip.tracks.tracks[0], crop_transforms(clip.tracks, 64)
    masks = occlusion_masks(frames, transforms, 64, track, shipped)
    faces = [face_mask(track, i, M, 64) for i, M in enumerate(transforms)]
    true = [
        occluded_share(cv2.warpAffine(c.astype(np.float32) / 255.0, M, (64, 64)), face)
        for c, M, face in zip(clip.occluder_masks(), transforms, faces)
    ]
    found = [occluded_share(mask, face) for mask, face in zip(masks, faces)]
    clean, covered = [i for i, t in enumerate(true) if t < 0.01], [i for i, t in enumerate(true) if t > 0.9]
    assert len(clean) >= 4 and len(covered) >= 4, true
    assert max(found[i] for i in clean) <= 0.01, found
    assert min(found[i] for i in covered) > 0.9, found


def test_an_edit_uses_the_segmenter_on_faces_of_its_world(tmp_path, capsys):
    """The embedded model's card names its segmenter: an edit of a FaceWorld face uses it and
    .run.json says so, and the microphone's pixels keep the input."""
    from faceworld import HELD_OUT_IDS

    clip, frames, video = faceworld_clip(tmp_path, HELD_OUT_IDS[0], ["microphone"])
    tracks = clip.tracks.save(tmp_path / "mic.tracks.json")
    solid = clip.occluder_masks() >= 252
    changed = {}
    for flag in ("--occlusion", "--no-occlusion"):
        out = tmp_path / f"{flag.strip('-')}.mp4"
        argv = ["edit", str(video), "-o", str(out), "--prompt", "a smiling face", "--steps", "4"]
        code, _, stderr = run([*argv, "--tracks", str(tracks), "--cache-dir", str(tmp_path / "c"), flag], capsys)
        assert code == 0, stderr
        edited = np.stack(list(iter_frames(out))).astype(int)
        changed[flag] = float((np.abs(edited - frames).max(-1) > 8)[solid].mean())
        face = json.loads(out.with_name(out.stem + ".run.json").read_text())["faces"][0]
        if flag == "--occlusion":
            assert face["occlusion"]["method"] == OCCLUSION_METHOD + "+segmenter"
            assert face["occlusion"]["frames_occluded"] == clip.frames
    assert changed["--no-occlusion"] > 0.05
    assert changed["--occlusion"] <= 0.01


def test_a_face_outside_the_model_s_world_gets_no_segmenter(shared_clip, tmp_path, capsys):
    """The segmenter knows FaceWorld's faces only: a real face edited with the embedded model
    forced onto it (--allow-out-of-domain) gets the hands and the look, not the segmenter."""
    clean = []
    for frame in iter_frames(shared_clip("closeup.mp4")):
        clean.append(frame)
        if len(clean) == FRAMES:
            break
    video = write_video(tmp_path / "closeup.mp4", clean, 10.0)
    out = tmp_path / "out.mp4"
    argv = ["edit", str(video), "-o", str(out), "--prompt", "a face with eyeglasses", "--steps", "2"]
    code, _, stderr = run([*argv, "--allow-out-of-domain", "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, stderr
    face = json.loads(out.with_name("out.run.json").read_text())["faces"][0]
    assert face["occlusion"]["method"] == OCCLUSION_METHOD


def test_the_preview_shows_the_segmenter_s_regions_with_model(tmp_path, capsys, tiny_dir):
    from faceworld import HELD_OUT_IDS

    clip, frames, video = faceworld_clip(tmp_path, HELD_OUT_IDS[0], ["microphone"])
    mic = clip.occluder_masks() >= 252
    redness = {}
    for name, extra in (("with", ["--model", str(SHIPPED_MODELS)]), ("without", [])):
        code, _, stderr = run(["faces", str(video), "--preview", str(tmp_path / f"{name}.mp4"), *extra], capsys)
        assert code == 0, stderr
        shown = np.stack(list(iter_frames(tmp_path / f"{name}.mp4"))).astype(int)
        redness[name] = (shown[..., 0] - shown[..., 1]) - (frames[..., 0].astype(int) - frames[..., 1])
    face = np.zeros_like(mic)
    from ipfacediff.face import face_mask

    for i in range(clip.frames):
        face[i] = face_mask(clip.tracks.tracks[0], i, np.eye(2, 3), 128) > 0.5
    assert (mic & face).sum() > 100
    assert np.median(redness["with"][mic & face]) > 40
    assert np.median(redness["without"][mic & face]) < 10
    for argv, says in (
        (
            ["faces", str(video), "--preview", str(tmp_path / "p.mp4"), "--model", str(tiny_dir)],
            "no occluder segmenter",
        ),
        (["faces", str(video), "--model", str(SHIPPED_MODELS)], "add --preview"),
    ):
        code, _, stderr = run(argv, capsys)
        assert code == 2 and says in stderr and stderr.count("\n") == 1, stderr


def test_faceworld_trains_a_segmenter_into_a_model_folder(tmp_path, capsys, monkeypatch):
    """``python -m faceworld segmenter MODEL`` saves the segmenter in MODEL/occluder_segmenter and
    names it in MODEL's card; a second run replaces it whole."""
    import faceworld.segmenter
    from faceworld.cli import main

    monkeypatch.setattr(faceworld.segmenter, "FACES", 40)  # rendering 1500 training faces takes a while
    card = {"format_version": 1, "domain": "faceworld", "description": "FaceWorld's drawn faces"}
    card |= {"check": "vae_round_trip", "threshold": 16.0, "advice": "run ipfacediff demo", "identity_net": "net"}
    (tmp_path / "ipfacediff.json").write_text(json.dumps(card))
    (tmp_path / "net").mkdir()
    monkeypatch.chdir(tmp_path.parent)  # a model folder named relative to the working folder
    weights = {}
    for seed in (0, 1):
        try:
            main(["segmenter", tmp_path.name, "--steps", "3", "--seed", str(seed)])
        except SystemExit as done:
            assert not done.code, capsys.readouterr().err
        read = ModelCard.read(tmp_path)
        assert read.occluder_segmenter == tmp_path / "occluder_segmenter"
        assert json.loads((tmp_path / "ipfacediff.json").read_text())["identity_net"] == "net"  # kept relative
        weights[seed] = load_occluder_segmenter(read.occluder_segmenter).head.weight.detach().clone()
    assert not np.allclose(weights[0].numpy(), weights[1].numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipfacediff.json", "net", "occluder_segmenter"]
    try:
        main(["segmenter", str(tmp_path / "nowhere")])
    except SystemExit as done:
        assert done.code == 2
    assert "is not a model folder" in capsys.readouterr().err
