"""Numerics: the same edit gives the same video, and what float16 cannot hold never reaches the
cache or the video."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import moving_texture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_same_frames_encode_to_the_same_video_every_time(tmp_path):
    """libx264's macroblock tree made two writes of the same frames differ (a seeded edit was not
    repeatable); a small noisy clip showed it in about one write of three."""
    from ipfacediff.video import read_frames, write_video

    rng = np.random.default_rng(1)
    texture = moving_texture(40, size=96).astype(np.int16)
    frames = np.clip(texture + rng.integers(-3, 4, texture.shape), 0, 255).astype(np.uint8)
    first = None
    for attempt in range(12):
        path = write_video(tmp_path / f"{attempt}.mp4", iter(frames), 25.0)
        decoded = read_frames(path)
        if first is None:
            first = decoded
        assert np.array_equal(decoded, first), f"write {attempt} differs from the first"


@pytest.fixture(scope="module")
def overflowing_model(tiny_dir, tmp_path_factory):
    """The tiny model set with its UNet's output layer scaled up: finite in float32, past float16's
    range (65504) in float16, as a model whose activations are too large for float16 is."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("overflowing") / "models"
    shutil.copytree(tiny_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(1e5)
        unet.conv_out.bias.mul_(1e5)
    unet.save_pretrained(folder / "unet")
    return folder


def cached_latents(folder):
    from safetensors.torch import load_file

    for path in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(str(path))
        if "latents" in tensors:
            yield path, tensors["latents"]


def test_a_float16_overflow_is_one_error_line_and_nothing_non_finite_is_cached(overflowing_model, tmp_path):
    from ipfacediff.video import write_video

    from test_settings import run_entry_point

    clip = write_video(tmp_path / "in.mp4", iter(moving_texture(4, size=64)), 10.0)
    cache, out = tmp_path / "cache", tmp_path / "out.mp4"
    done = run_entry_point(
        "edit", str(clip), "-o", str(out), "-p", "a red face", "--model", str(overflowing_model),
        "--whole-frame", "--steps", "3", "--device", "cpu", "--dtype", "float16", "--cache-dir", str(cache),
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("error: the DDIM inversion") and "run again with --dtype float32" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not out.exists()
    found = list(cached_latents(cache))
    assert found  # the encoded frames were finite and kept
    for path, latents in found:
        assert latents.isfinite().all(), path


def test_the_same_model_in_float32_edits(overflowing_model, tmp_path):
    """The error's fix works: in float32 the same model's numbers stay finite."""
    from ipfacediff.job import load_pipeline
    from ipfacediff.settings import EditSettings

    pipe = load_pipeline(str(overflowing_model), device="cpu", dtype="float32")
    result = pipe(moving_texture(3), EditSettings(prompt="a red face", steps=3, whole_frame=True))
    assert result.latents.isfinite().all()


def test_non_finite_latents_are_not_decoded(overflowing_model):
    """Latents a float16 UNet overflowed in (a real forward pass) are refused at the decoder."""
    import torch

    from ipfacediff.diffusion import ddim_step, encode_frames, encode_prompt
    from ipfacediff.errors import NonFiniteError
    from ipfacediff.job import load_pipeline
    from ipfacediff.settings import EditSettings

    pipe = load_pipeline(str(overflowing_model), device="cpu", dtype="float16")
    frames = moving_texture(2)
    clean = encode_frames(pipe.vae, frames)
    texts = encode_prompt(pipe.tokenizer, pipe.text_encoder, ["a red face"])
    with torch.no_grad():
        eps = pipe.unet(clean.half(), torch.tensor(501), encoder_hidden_states=texts.expand(2, -1, -1)).sample
    latents = ddim_step(clean, eps.float(), 0.5, 0.9)
    assert not latents.isfinite().all()
    inverted = pipe.invert(frames, steps=2)[0]
    with pytest.raises(NonFiniteError, match=r"^denoising .*not finite.*--dtype float32"):
        pipe.decode(latents, frames, inverted, EditSettings(prompt="a red face", detail_transfer=False), None)


@pytest.fixture(scope="module")
def decoders(tiny_dir):
    """The tiny model set's VAE in float32 and in float16 (CPU), with dlib's identity net."""
    import torch
    from diffusers import AutoencoderKL

    from ipfacediff.identity import IdentityEncoder

    full = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    half = AutoencoderKL.from_pretrained(tiny_dir / "vae", torch_dtype=torch.float16)
    return full, half, IdentityEncoder()


def test_the_identity_gradient_through_a_float16_decoder_is_the_float32_one(decoders):
    """Through a float16 decoder the gradient is finite, float32, and points where float32's does
    (guidance moves along its direction only); the loss scale keeps the entries that underflow
    to zero unscaled."""
    import torch
    import torch.nn.functional as F

    from ipfacediff.diffusion import encode_frames
    from ipfacediff.editing.guidance import identity_gradient

    full, half, net = decoders
    point = encode_frames(full, moving_texture(1, size=256))
    with torch.no_grad():
        target = net(torch.from_numpy(moving_texture(1, size=256, seed=3)).permute(0, 3, 1, 2).float() / 127.5 - 1)
    reference, similarity = identity_gradient(full, net, point, target)
    gradient, half_similarity = identity_gradient(half, net, point, target)
    assert gradient.dtype == torch.float32 and gradient.isfinite().all()
    assert abs(half_similarity - similarity) < 1e-2
    assert F.cosine_similarity(gradient.flatten(), reference.flatten(), dim=0) > 0.98
    assert abs(gradient.norm() / reference.norm() - 1) < 0.1
    unscaled, _ = identity_gradient(half, net, point, target, scale=1.0)
    assert (gradient == 0).sum() <= (unscaled == 0).sum()


def test_a_keyframe_whose_gradient_overflows_keeps_its_noise_and_is_counted(tiny_dir, decoders):
    """A float16 decoder whose activations pass 65504 gives inf; that frame is left unguided."""
    import torch
    from diffusers import AutoencoderKL

    from ipfacediff.diffusion import encode_frames
    from ipfacediff.job import load_pipeline

    pipe = load_pipeline(str(tiny_dir), device="cpu", dtype="float32")
    frames = moving_texture(2)
    targets = pipe.source_identities(frames)
    latents = encode_frames(pipe.vae, moving_texture(2, seed=5))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    alpha = 0.8
    x_t = alpha**0.5 * latents + (1 - alpha) ** 0.5 * noise
    guided = pipe.guide_identity(x_t, noise, alpha, targets, scale=0.05)
    assert not torch.equal(guided, noise) and pipe.identity_steps_skipped == 0

    overflowing = AutoencoderKL.from_pretrained(tiny_dir / "vae", torch_dtype=torch.float16)
    with torch.no_grad():
        overflowing.decoder.conv_in.weight.mul_(1e6)
    pipe.register_modules(vae=overflowing)
    guided = pipe.guide_identity(x_t, noise, alpha, targets, scale=0.05)
    assert guided.isfinite().all()
    torch.testing.assert_close(guided, noise)
    assert pipe.identity_steps_skipped == 2


def test_a_decoder_that_overflows_float16_is_one_error_not_a_video(tiny_dir):
    """Finite latents through a float16 decoder whose activations pass 65504: refused, not written
    as arbitrary bytes."""
    import torch
    from diffusers import AutoencoderKL

    from ipfacediff.diffusion import decode_latents, encode_frames
    from ipfacediff.errors import NonFiniteError

    half = AutoencoderKL.from_pretrained(tiny_dir / "vae", torch_dtype=torch.float16)
    latents = encode_frames(AutoencoderKL.from_pretrained(tiny_dir / "vae"), moving_texture(2))
    frames = decode_latents(half, latents)
    assert frames.shape[0] == 2
    with torch.no_grad():
        half.decoder.conv_in.weight.mul_(1e6)
    with pytest.raises(NonFiniteError, match=r"^the VAE decoder .*not finite.*float16.*--dtype float32"):
        decode_latents(half, latents)
