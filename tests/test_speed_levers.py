"""The speed levers of #35: what a re-edit reads instead of computing, and the compiled UNets."""

from __future__ import annotations

import numpy as np

from ipfacediff.diffusion import InversionCache
from ipfacediff.settings import EditSettings

from conftest import moving_texture


def feature_files(cache: InversionCache) -> list[str]:
    return sorted(p.name for p in cache.root.glob("*/features_*.safetensors"))


def test_reedit_reads_identity_features_and_gives_the_same_edit(tiny_pipe, tmp_path, one_thread):
    frames = moving_texture(10)
    settings = dict(steps=4, seed=2, identity_gradient=0.0, inject_attention_until=600)
    cache = InversionCache(tmp_path / "shared")
    first = tiny_pipe(frames, EditSettings(prompt="a face with eyeglasses", **settings), cache=cache)
    assert first.unet_calls["identity"] > 0 and feature_files(cache)
    # A new prompt on the same clip and seed: ε1's features come from the cache ...
    reedit = tiny_pipe(frames, EditSettings(prompt="a smiling face", **settings), cache=cache)
    assert reedit.unet_calls["identity"] == 0 and reedit.unet_calls["invert"] == 0
    # ... and the edit is the one a fresh cache gives, bit for bit.
    fresh = tiny_pipe(frames, EditSettings(prompt="a smiling face", **settings), cache=InversionCache(tmp_path / "new"))
    assert fresh.unet_calls["identity"] == first.unet_calls["identity"]
    assert np.array_equal(reedit.frames, fresh.frames)
    # Another seed draws other keyframes: their features are computed, not mistaken for the cached ones.
    other = tiny_pipe(frames, EditSettings(prompt="a smiling face", **{**settings, "seed": 5}), cache=cache)
    assert other.unet_calls["identity"] > 0


def test_compiled_unets_give_the_same_video_within_rounding(tiny_dir, tmp_path, one_thread):
    """ModelSpec(compile=True) goes through dynamo with the pipeline's own attention processors,
    hooks and LoRA switching; the graphs run by aot_eager here (inductor needs minutes of C
    compilation on the CPU: benchmarks/README.md), the same capture inductor compiles."""
    import torch

    from ipfacediff.models import compile_unets, is_compiled
    from ipfacediff.service import load_pipeline
    from ipfacediff.settings import ModelSpec

    frames = moving_texture(6)
    settings = EditSettings(prompt="a face with eyeglasses", steps=3, identity_gradient=0.0)
    eager = load_pipeline(ModelSpec(model=str(tiny_dir), device="cpu", dtype="float32"))
    reference = eager(frames, settings, cache=InversionCache(tmp_path / "cache"))
    compiled = load_pipeline(ModelSpec(model=str(tiny_dir), device="cpu", dtype="float32"))
    compile_unets([compiled.unet, compiled.identity_unet], backend="aot_eager")
    assert is_compiled(compiled.unet)
    result = compiled(frames, settings, cache=InversionCache(tmp_path / "cache"))
    # Its own inversion: a compiled run neither reads nor feeds the uncompiled one's cache entries.
    assert result.unet_calls["invert"] > 0
    torch.testing.assert_close(result.latents, reference.latents, atol=1e-4, rtol=1e-4)
    assert np.abs(result.frames.astype(int) - reference.frames.astype(int)).max() <= 2


def test_model_spec_compile_loads_compiled_unets_and_leaves_the_default_eager(tiny_dir):
    """Compilation itself waits for the first call, so loading stays quick; the default is eager."""
    from ipfacediff.models import is_compiled, load_model_set
    from ipfacediff.settings import ModelSpec

    compiled = load_model_set(ModelSpec(model=str(tiny_dir), device="cpu", compile=True))
    assert is_compiled(compiled.unet) and is_compiled(compiled.identity_unet)
    assert not is_compiled(load_model_set(ModelSpec(model=str(tiny_dir), device="cpu")).unet)
