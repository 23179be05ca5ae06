"""The model card and the in-domain check (ipfacediff/domain.py).

The embedded FaceWorld model must pass FaceWorld's faces and refuse real ones: a held-out FaceWorld
clip (through the video codec, cut with its ground-truth tracks), a two-face scene clip and an
edited clip pass; the real clips of ../shared/data (faces found by the project's own detector, as
an edit finds them; skipped when absent) and flat frames are refused. A model folder without a
card, a hub id and a single file are not checked; a malformed card is one UserError line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ipfacediff.domain import (
    MODEL_CARD,
    ModelCard,
    check_faces,
    check_track,
    domain_scores,
    sample_indices,
)
from ipfacediff.errors import OutOfDomainError, UserError
from ipfacediff.job import SHIPPED_MODELS

ADVICE = (
    "pass --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda for real videos, or run ipfacediff demo"
)


@pytest.fixture(scope="module")
def card() -> ModelCard:
    card = ModelCard.read(SHIPPED_MODELS)
    assert card is not None, f"the embedded model has no {MODEL_CARD}"
    return card


@pytest.fixture(scope="module")
def vae():
    import torch
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(SHIPPED_MODELS / "vae", torch_dtype=torch.float32).eval()


def clip_crops(clip, tmp_path) -> list[np.ndarray]:
    """Each face's aligned 64² crops of a FaceWorld clip as an edit cuts them: the clip through the
    video codec, the ground-truth tracks, the smoothed alignment."""
    from ipfacediff.face import alignment_transforms, crop_face
    from ipfacediff.video import read_frames, write_video

    frames = read_frames(write_video(tmp_path / "clip.mp4", iter(clip), clip.fps))
    crops = []
    for track in clip.tracks.tracks:
        transforms = alignment_transforms(track, 64)
        crops.append(np.stack([crop_face(frames[f], transforms[f], 64) for f in track.frames]))
    return crops


def test_embedded_card_reads(card):
    assert card.domain == "faceworld"
    assert card.description == "FaceWorld's drawn faces"
    assert card.model_name == "the embedded model"
    assert card.check == "vae_round_trip"
    assert card.resolution == 64
    assert card.advice == ADVICE
    assert card.identity_net == SHIPPED_MODELS / "identity_net"  # the trainers' net, not the oracle
    assert card.occluder_segmenter == SHIPPED_MODELS / "occluder_segmenter"
    assert card.format_version == 1
    # the threshold lies between the measured margins, with room on both sides
    assert card.out_of_domain_max + 2 < card.threshold < card.in_domain_min - 2
    text = (SHIPPED_MODELS / MODEL_CARD).read_text()
    assert ModelCard.from_dict(json.loads(text), SHIPPED_MODELS) == card


def test_held_out_faceworld_clips_pass(card, vae, tmp_path):
    from faceworld import EDITS, HELD_OUT_IDS, render_clip

    person = HELD_OUT_IDS[0]
    clip = render_clip(person, seed=person, frames=12, size=128)  # as the quality benchmark renders it
    scene = render_clip([HELD_OUT_IDS[1], HELD_OUT_IDS[2]], seed=3, frames=12, size=256)  # two moving faces
    tracks = {
        "held-out": clip_crops(clip, tmp_path),
        "eyeglasses": clip_crops(clip.with_edit(EDITS["eyeglasses"]), tmp_path),
        "scene": clip_crops(scene, tmp_path),
    }
    assert len(tracks["scene"]) == 2
    for name, faces in tracks.items():
        for index, crops in enumerate(faces):
            result = check_track(card, vae, crops, label=f"face {index} of {name}.mp4")
            assert result.passed, result.message
            assert result.score >= card.threshold
            assert len(result.scores) == len(crops) == 12
            assert f"face {index} of {name}.mp4" in result.message and "\n" not in result.message


@pytest.mark.parametrize("name", ["closeup.mp4", "jogger.mp4"])
def test_real_clips_are_refused(card, vae, shared_clip, name):
    from ipfacediff.job import face_crops
    from ipfacediff.video import probe_video

    path = shared_clip(name)
    found = face_crops(path, probe_video(path), 64)  # the project's detector and alignment, as an edit
    assert found.tracks.tracks, f"no face found in {name}"
    results = check_faces(card, vae, found.crops, name)
    assert set(results) == {t.id for t in found.tracks.tracks}
    for track_id, result in results.items():
        assert not result.passed, result.message
        assert result.score < card.threshold
        assert result.message.startswith(
            f"the embedded model edits FaceWorld's drawn faces, and face {track_id} of {name} is not one (check: "
        )
        assert result.message.endswith(f"): {ADVICE}") and "\n" not in result.message
        # the refusal as an error: the command line's line, and its parts for the web page's own words
        error = result.error()
        assert isinstance(error, OutOfDomainError) and isinstance(error, UserError)
        assert str(error) == result.message
        assert (error.label, error.model_name, error.description) == (
            f"face {track_id} of {name}",
            "the embedded model",
            "FaceWorld's drawn faces",
        )
        assert (error.score, error.threshold) == (result.score, card.threshold)


def test_flat_and_noise_crops_are_refused(card, vae):
    rng = np.random.default_rng(0)
    for crops in (
        np.zeros((4, 64, 64, 3), np.uint8),
        np.full((4, 64, 64, 3), 200, np.uint8),
        rng.integers(0, 256, (4, 64, 64, 3)).astype(np.uint8),
    ):
        result = check_track(card, vae, crops, label="face 0 of flat.mp4")
        assert not result.passed, result.message


def test_crops_of_another_resolution_are_scored_at_the_cards(card, vae, tmp_path):
    import cv2

    from faceworld import HELD_OUT_IDS, render_clip

    crops = clip_crops(render_clip(HELD_OUT_IDS[3], seed=5, frames=6, size=128), tmp_path)[0]
    big = np.stack([cv2.resize(c, (128, 128), interpolation=cv2.INTER_CUBIC) for c in crops])
    assert check_track(card, vae, big, label="face 0").passed


def test_sampling_spreads_over_the_track(vae):
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    picked = sample_indices(100)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 99 and np.all(np.diff(picked) > 0)
    assert len(domain_scores(vae, np.zeros((40, 64, 64, 3), np.uint8))) == 16
    with pytest.raises(ValueError):
        domain_scores(vae, np.zeros((0, 64, 64, 3), np.uint8))


def test_a_model_without_a_card_is_not_checked(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert ModelCard.read(tmp_path) is None  # an SD-1.x folder, the tiny test models
    assert ModelCard.read("stable-diffusion-v1-5/stable-diffusion-v1-5") is None  # a hub id
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    assert ModelCard.read(weights) is None  # a single file


def test_card_round_trip(tmp_path):
    (tmp_path / "identity").mkdir()
    card = ModelCard(
        "faceworld",
        "FaceWorld's drawn faces",
        "vae_round_trip",
        16.0,
        "run ipfacediff demo",
        model_name="my model",
        resolution=64,
        in_domain_min=20.5,
        out_of_domain_max=11.0,
        identity_net=tmp_path / "identity",
        occluder_segmenter=tmp_path / "segmenter",
        measured={"by": "a test"},
    )
    (tmp_path / "segmenter").mkdir()
    path = card.write(tmp_path)
    assert path == tmp_path / MODEL_CARD
    assert json.loads(path.read_text())["identity_net"] == "identity"  # relative in the file
    assert json.loads(path.read_text())["occluder_segmenter"] == "segmenter"
    assert ModelCard.read(tmp_path) == card
    with pytest.raises(ValueError):  # strict JSON
        ModelCard("x", "x", "vae_round_trip", math.nan, "x").write(tmp_path / "identity")


GOOD = {
    "format_version": 1,
    "domain": "faceworld",
    "description": "FaceWorld's drawn faces",
    "check": "vae_round_trip",
    "threshold": 16.0,
    "advice": "run ipfacediff demo",
}


@pytest.mark.parametrize(
    "content, says",
    [
        ("{not json", "is not JSON"),
        ("", "is empty"),
        ("[1, 2]", "not an object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "threshold"}), "lacks 'threshold'"),
        (json.dumps(GOOD | {"threshold": "high"}), "threshold must be a finite number"),
        (json.dumps(GOOD).replace("16.0", "NaN"), "threshold must be a finite number"),
        (json.dumps(GOOD | {"check": "vibes"}), "check 'vibes' is not one of"),
        (json.dumps(GOOD | {"format_version": 99}), "newer than this ipfacediff reads"),
        (json.dumps(GOOD | {"identity_net": "nowhere/net"}), "does not exist"),
        (json.dumps(GOOD | {"occluder_segmenter": "nowhere"}), "occluder_segmenter"),
        (json.dumps(GOOD | {"occluder_segmenter": 3}), "must be null or a path"),
        (json.dumps(GOOD | {"resolution": 3}), "resolution must be"),
        (json.dumps(GOOD | {"description": "two\nlines"}), "one-line string"),
    ],
)
def test_a_malformed_card_is_one_user_error_line(tmp_path, content, says):
    (tmp_path / MODEL_CARD).write_text(content)
    with pytest.raises(UserError) as caught:
        ModelCard.read(tmp_path)
    message = str(caught.value)
    assert says in message and str(tmp_path / MODEL_CARD) in message, message
    assert "\n" not in message
