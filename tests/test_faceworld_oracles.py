"""FaceWorld oracles: the smoke preset trains, saves and reloads both networks; the identity net has
IdentityEncoder's interface (normalised, differentiable); the oracle gives probabilities; the
training data never holds a held-out identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from faceworld import EDITS, HELD_OUT_IDS, Attributes, dataset, identity, is_held_out
from faceworld.oracles import (
    ATTRIBUTE_NAMES,
    PRESETS,
    AttributeOracle,
    FaceWorldIdentity,
    attribute_labels,
    render_heldout_set,
    render_training_set,
    train_oracles,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracles")
    messages: list[str] = []
    report = train_oracles(out, preset="smoke", device="cpu", seed=0, progress=messages.append)
    return out, report, messages


@pytest.fixture(scope="module")
def held_out_images():
    return np.stack([s.image for s in dataset("held_out", 6, size=64, seed=3)])


def test_smoke_preset_trains_and_saves(trained):
    out, report, messages = trained
    for sub in ("identity", "attributes"):
        assert (out / sub / "config.json").is_file() and (out / sub / "model.safetensors").is_file()
    saved = json.loads((out / "oracles.json").read_text())
    assert saved["preset"] == "smoke" and saved["identity"]["steps"] > 0 and saved["attributes"]["steps"] > 0
    assert saved["seconds"]["total"] < 60
    held = saved["identity"]["held_out"]
    for key in ("mean_cosine_same", "mean_cosine_different", "same_person_threshold", "verification_accuracy"):
        assert np.isfinite(held[key])
    assert set(held["edit_invariance"]) == set(EDITS)
    assert set(saved["attributes"]["held_out"]["per_attribute"]) == set(ATTRIBUTE_NAMES)
    assert set(saved["attributes"]["held_out"]["edit_flag"]) == set(EDITS)
    assert messages, "progress was never called"
    # fp16 on disk
    from safetensors.torch import load_file

    weights = load_file(str(out / "identity" / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values())


def test_training_draw_holds_no_held_out_identity(trained):
    _, report, _ = trained
    used = report["training_identity_ids"]
    assert len(used) == PRESETS["smoke"].identities
    assert not any(is_held_out(i) for i in used) and max(used) < HELD_OUT_IDS.start
    assert report["training_data"]["held_out_ids_in_training"] == 0
    # the evaluation, conversely, uses held-out people only
    assert report["heldout_ids"] and all(is_held_out(i) for i in report["heldout_ids"])
    with pytest.raises(ValueError, match="training identities"):
        render_training_set([3, 1000], scenes=1)
    data = render_training_set([5, 7], scenes=2, seed=1)
    assert data.images.shape == (8, 64, 64, 3) and data.images.dtype == np.uint8
    assert sorted(set(data.identity_ids.tolist())) == [5, 7]
    assert np.array_equal(data.identity_ids[0::2], data.identity_ids[1::2])  # pairs are one person
    heldout = render_heldout_set(2, seed=0)
    assert all(is_held_out(i) for i in heldout.identity_ids)


def test_identity_reload_same_outputs_normalised_and_differentiable(trained, held_out_images):
    out, report, _ = trained
    model = FaceWorldIdentity.from_pretrained(out / "identity")
    again = FaceWorldIdentity.from_pretrained(out / "identity" / "config.json")
    assert model.embedding_dim == 128
    assert model.same_person_threshold == pytest.approx(report["identity"]["same_person_threshold"])
    crops = torch.from_numpy(held_out_images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        a, b = model(crops), again(crops)
    torch.testing.assert_close(a, b)
    assert a.shape == (6, 128)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.descriptor(crops), a)
    # any crop size is resized to 64
    big = torch.nn.functional.interpolate(crops, size=(128, 128), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(big), a).min() > 0.9
    # same as the model the training returned (fp16 rounding happens before the figures are taken)
    np.testing.assert_allclose(model.embed_images(held_out_images), a.numpy(), atol=1e-5)
    # differentiable w.r.t. the crops, weights frozen; train() keeps inference mode
    x = crops.clone().requires_grad_(True)
    model.train()
    assert not model.net.training
    e = model(x)
    loss = (1 - model.similarity(e[:3], e[3:])).sum() + model.distance(e[:3], e[3:]).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    same = model.same_person(e[:1].detach(), e[:1].detach())
    assert bool(same.all())


def test_oracle_reload_and_probabilities(trained, held_out_images):
    out, _, _ = trained
    oracle = AttributeOracle.from_pretrained(out / "attributes")
    again = AttributeOracle.from_pretrained(out / "attributes")
    probs = oracle.predict_proba(held_out_images)
    assert set(probs) == set(ATTRIBUTE_NAMES)
    for name, p in probs.items():
        assert p.shape == (6,) and p.dtype == np.float32
        assert np.all((p >= 0) & (p <= 1)), name
        np.testing.assert_array_equal(p, again.predict_proba(held_out_images)[name])
    # a tensor in [-1, 1] and a single uint8 image give the same
    crops = torch.from_numpy(held_out_images).permute(0, 3, 1, 2).float() / 127.5 - 1
    from_tensor = oracle.predict_proba(crops)
    one = oracle.predict_proba(held_out_images[0])
    for name in ATTRIBUTE_NAMES:
        np.testing.assert_allclose(from_tensor[name], probs[name], atol=1e-6)
        np.testing.assert_allclose(one[name], probs[name][:1], atol=1e-6)
    with pytest.raises(ValueError):
        FaceWorldIdentity.from_pretrained(out / "attributes")  # the wrong kind of model


def test_attribute_labels():
    natural_blonde = next(i for i in range(1000) if identity(i).hair_name == "blonde")
    dark = next(i for i in range(1000) if identity(i).hair_name == "black")
    assert attribute_labels(natural_blonde, Attributes(age=0.2))["blonde_hair"]
    assert not attribute_labels(dark, Attributes())["blonde_hair"]
    for person in (natural_blonde, dark):
        for age in (0.0, 0.5, 1.0):
            assert attribute_labels(person, EDITS["blonde_hair"].apply(Attributes(age=age)))["blonde_hair"]
    labels = attribute_labels(dark, Attributes(eyeglasses=True, beard=True, smile=0.5, age=0.65, hat=True))
    assert labels == {"eyeglasses": True, "blonde_hair": False, "beard": True, "smile": True, "old": True, "hat": True}
    assert not any(attribute_labels(dark, Attributes(smile=0.49, age=0.64)).values())
