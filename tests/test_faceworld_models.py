"""The shipped FaceWorld default: it loads through the normal loader and edits what it is asked to."""

from __future__ import annotations

import numpy as np
import pytest

from ipfacediff.job import SHIPPED_MODELS
from ipfacediff.settings import EditSettings

pytestmark = pytest.mark.skipif(
    not (SHIPPED_MODELS / "model_index.json").is_file(),
    reason="this checkout ships no FaceWorld models (ipfacediff/assets/faceworld)",
)


def test_shipped_models_load_through_the_normal_loader():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ipfacediff.job import default_model_dir
    from ipfacediff.models import load_clip, load_model_set

    assert default_model_dir() == SHIPPED_MODELS
    models = load_model_set(str(SHIPPED_MODELS))
    assert isinstance(models.unet, UNet2DConditionModel) and isinstance(models.vae, AutoencoderKL)
    ids = models.tokenizer("a face with eyeglasses").input_ids
    assert len(ids) == 6  # start, four whole words, end
    assert load_clip(str(SHIPPED_MODELS / "clip")).image_size == 64
    total = sum(p.stat().st_size for p in SHIPPED_MODELS.rglob("*.safetensors"))
    assert total <= 30 * 2**20


def test_shipped_models_bring_their_identity_and_edit_adapters():
    from faceworld import EDITS, Attributes
    from ipfacediff.job import load_pipeline
    from ipfacediff.models import AdapterLibrary

    library = AdapterLibrary.read(SHIPPED_MODELS)
    assert library is not None and library.identity.is_file()
    assert {e.name for e in library.edits} == set(EDITS)
    pipe = load_pipeline()
    assert "identity" in pipe.unet.peft_config
    tuned = library.weights()
    for name, edit in EDITS.items():
        assert pipe.plan_edit(EditSettings(prompt=edit.target_caption(Attributes()))).edit_weights == {
            f"edit:{name}": tuned.get(name, 1.0)
        }


def test_an_edit_of_a_held_out_person_raises_the_oracles_probability(tmp_path):
    from faceworld import render_clip
    from faceworld.oracles import AttributeOracle
    from ipfacediff.face import alignment_transforms, crop_face
    from ipfacediff.job import edit_video, load_pipeline
    from ipfacediff.models import AdapterLibrary
    from ipfacediff.video import read_frames, write_video

    clip = render_clip(1011, seed=5, frames=6, size=128)
    source = write_video(tmp_path / "in.mp4", iter(clip), clip.fps)
    tracks = clip.tracks.save(tmp_path / "in.tracks.json")
    out = tmp_path / "out.mp4"
    report = edit_video(
        source,
        out,
        EditSettings(prompt="a face with eyeglasses", steps=20),
        pipeline=load_pipeline(),
        tracks_path=tracks,
        log=lambda _m: None,
    )
    shipped = AdapterLibrary.read(SHIPPED_MODELS).weights().get("eyeglasses", 1.0)
    assert report.faces[0]["edit_adapters"] == {"eyeglasses": shipped}
    from ipfacediff.editing import DEFAULT_GUIDANCE

    assert report.faces[0]["guidance"] == AdapterLibrary.read(SHIPPED_MODELS).guidances().get(
        "eyeglasses", DEFAULT_GUIDANCE
    )
    oracle = AttributeOracle.from_pretrained(SHIPPED_MODELS / "oracles" / "attributes")
    transforms = alignment_transforms(clip.tracks.tracks[0], 64)

    def glasses(frames: np.ndarray) -> float:
        crops = np.stack([crop_face(f, transforms[i], 64) for i, f in enumerate(frames)])
        return float(oracle.predict_proba(crops)["eyeglasses"].mean())

    before, after = glasses(read_frames(source)), glasses(read_frames(out))
    assert after > before + 0.2, (before, after)
