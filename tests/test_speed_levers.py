"""The speed levers of #35: what a re-edit reads instead of computing, and the compiled UNets."""

from __future__ import annotations

import numpy as np
import torch

from ipfacediff.diffusion import InversionCache
from ipfacediff.settings import EditSettings

from conftest import moving_texture


def feature_files(cache: InversionCache) -> list[str]:
    return sorted(p.name for p in cache.root.glob("*/features_*.safetensors"))


def test_reedit_reads_identity_features_and_gives_the_same_edit(tiny_pipe, tmp_path, one_thread, monkeypatch):
    import ipfacediff.editing.denoise as denoise

    searches = []  # the nearest-token searches of the propagation, each step's
    search = denoise.nearest_tokens
    monkeypatch.setattr(denoise, "nearest_tokens", lambda *a, **kw: searches.append(a[0]) or search(*a, **kw))
    frames = moving_texture(10)
    settings = dict(steps=4, seed=2, identity_gradient=0.0, inject_attention_until=600)
    cache = InversionCache(tmp_path / "shared")
    first = tiny_pipe(frames, EditSettings(prompt="a face with eyeglasses", **settings), cache=cache)
    assert first.unet_calls["identity"] > 0 and feature_files(cache)
    assert len(searches) == 4 and len(list(cache.root.glob("*/nearest_*.safetensors"))) == 4
    # A new prompt on the same clip and seed: ε1's features and the nearest tokens come from the cache ...
    reedit = tiny_pipe(frames, EditSettings(prompt="a smiling face", **settings), cache=cache)
    assert reedit.unet_calls["identity"] == 0 and reedit.unet_calls["invert"] == 0 and len(searches) == 4
    # ... and the edit is the one a fresh cache gives, bit for bit.
    fresh = tiny_pipe(frames, EditSettings(prompt="a smiling face", **settings), cache=InversionCache(tmp_path / "new"))
    assert fresh.unet_calls["identity"] == first.unet_calls["identity"]
    assert np.array_equal(reedit.frames, fresh.frames)
    # Another seed draws other keyframes: their features are computed, not mistaken for the cached ones.
    other = tiny_pipe(frames, EditSettings(prompt="a smiling face", **{**settings, "seed": 5}), cache=cache)
    assert other.unet_calls["identity"] > 0 and len(searches) > 4 + 4


def test_reedit_reads_the_blends_reference_branch_and_source_identities_and_gives_the_same_edit(
    tiny_pipe, tmp_path, one_thread
):
    """What a new prompt does not change (ε2 under the local blend's reference, the source faces'
    identities) is read from the cache beside the inversion; the edit is the uncached one."""
    from ipfacediff.editing import IPFaceDiffPipeline

    class Counting(IPFaceDiffPipeline):
        measured = 0

        def source_identities(self, frames, **kwargs):
            self.measured += 1
            return super().source_identities(frames, **kwargs)

    pipe = Counting(**tiny_pipe.components, edit_adapter_weights={}, model_source="tiny")
    frames = moving_texture(6)
    settings = dict(steps=4, seed=2, identity_gradient=0.3)
    cache = InversionCache(tmp_path / "shared")
    # Both prompts' subject words are "a face with": the blend compares each with the same reference.
    first = pipe(frames, EditSettings(prompt="a face with eyeglasses", **settings), cache=cache)
    assert pipe.measured == 1 and sorted(p.name for p in cache.root.glob("*/reference_noise.safetensors"))
    reedit = pipe(frames, EditSettings(prompt="a face with red lipstick", **settings), cache=cache)
    assert pipe.measured == 1  # the source faces' identities were read
    assert reedit.unet_calls["mask"] * 2 == first.unet_calls["mask"]  # only the prompt's branch ran
    fresh = pipe(
        frames, EditSettings(prompt="a face with red lipstick", **settings), cache=InversionCache(tmp_path / "new")
    )
    assert fresh.unet_calls["mask"] == first.unet_calls["mask"] and pipe.measured == 2
    assert np.array_equal(reedit.frames, fresh.frames) and torch.equal(reedit.latents, fresh.latents)
    # Another reference ("a face"): its branch is measured, not mistaken for the cached one.
    other = pipe(frames, EditSettings(prompt="a smiling face", **settings), cache=cache)
    assert other.unet_calls["mask"] == first.unet_calls["mask"]
    # So is the same reference at another batch size: a UNet rounds by its batch.
    batched = pipe(frames, EditSettings(prompt="a face with red lipstick", **settings), cache=cache, batch_size=4)
    assert batched.unet_calls["mask"] == 2 * 3 * 2  # both branches, 3 levels, 2 batches of at most 4 frames


def test_compiled_unets_give_the_same_video_within_rounding(tiny_dir, tmp_path, one_thread):
    """ModelSpec(compile=True) goes through dynamo with the pipeline's own attention processors,
    hooks and LoRA switching; the graphs run by aot_eager here (inductor needs minutes of C
    compilation on the CPU: benchmarks/README.md), the same capture inductor compiles."""
    import torch

    from ipfacediff.models import compile_unets, is_compiled
    from ipfacediff.service import load_pipeline
    from ipfacediff.settings import ModelSpec

    frames = moving_texture(2)  # each batch size met compiles once more: the fewest frames and steps that meet all
    settings = EditSettings(prompt="a face with eyeglasses", steps=2, identity_gradient=0.0)
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
