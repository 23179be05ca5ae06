from __future__ import annotations

import pytest
import torch

from ipfacediff.diffusion import (
    InversionCache,
    ddim_step,
    encode_frames,
    encode_prompt,
    invert_frames,
    sample_from_inverted,
)
from ipfacediff.models import load_model_set

from conftest import moving_texture

RECONSTRUCTION_TOLERANCE = 0.4  # relative L1 latent error of 50-step DDIM inversion, tiny random model


@pytest.fixture(scope="module")
def setup(tiny_dir):
    models = load_model_set(str(tiny_dir))
    frames = moving_texture(4, size=64)
    clean = encode_frames(models.vae, frames)
    empty = encode_prompt(models.tokenizer, models.text_encoder, [""])
    return models, clean, empty


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def test_reconstruction_error_falls_with_steps(setup):
    models, clean, empty = setup
    errors = {}
    for steps in (10, 20, 50):
        inverted = invert_frames(models.unet, models.scheduler, clean, empty, steps=steps)
        rebuilt = sample_from_inverted(models.unet, inverted, empty, prediction_type="epsilon")
        errors[steps] = ((rebuilt - clean).abs().mean() / clean.abs().mean()).item()
    assert errors[10] > errors[20] > errors[50], errors
    assert errors[50] < RECONSTRUCTION_TOLERANCE, errors


def test_cached_noise_reverses_the_inversion_exactly(setup):
    models, clean, empty = setup
    inverted = invert_frames(models.unet, models.scheduler, clean, empty, steps=10)
    current = inverted.latents[0]
    for step in range(10):
        current = ddim_step(current, inverted.source_eps(step), *inverted.alphas[step])
    torch.testing.assert_close(current, clean, atol=1e-4, rtol=0)


def test_second_inversion_makes_no_unet_call_and_resumes(setup, tmp_path):
    models, clean, empty = setup
    cache = InversionCache(tmp_path)
    counter = CallCounter(models.unet)
    try:
        first = invert_frames(
            models.unet, models.scheduler, clean, empty, steps=6, cache=cache, cache_key="k", batch_size=2
        )
        assert counter.calls == 6 * 2
        counter.calls = 0
        second = invert_frames(
            models.unet, models.scheduler, clean, empty, steps=6, cache=cache, cache_key="k", batch_size=2
        )
        assert counter.calls == 0 and second.unet_calls == 0
        for a, b in zip(first.latents, second.latents):
            assert torch.equal(a, b)
        assert set(first.features) == set(second.features)

        # An interrupted run: the last three steps never reached the disk.
        for step in range(3):
            (tmp_path / "k" / f"step_{step:04d}.safetensors").unlink()
        counter.calls = 0
        resumed = invert_frames(
            models.unet, models.scheduler, clean, empty, steps=6, cache=cache, cache_key="k", batch_size=2
        )
        assert counter.calls == 3 * 2
        for a, b in zip(first.latents, resumed.latents):
            assert torch.equal(a, b)
    finally:
        counter.handle.remove()


def test_encoding_is_deterministic(setup):
    models, clean, _ = setup
    again = encode_frames(models.vae, moving_texture(4, size=64))
    assert torch.equal(clean, again)
    assert clean.shape == (4, 4, 16, 16)
    assert 0.3 < clean.std().item() < 3  # the tiny VAE's scaling factor gives roughly unit latents
