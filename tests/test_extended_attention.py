"""The keyframes' extended attention of #35: token merging in the other keyframes' keys/values
(a setting, off by default) and query chunks that bound the score matrix where SDPA would build it whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipfacediff.editing import FeatureController, feature_hooks
from ipfacediff.editing.hooks import extended_attention, highest_resolution_layers, merge_tokens
from ipfacediff.errors import SettingError
from ipfacediff.settings import EditSettings

from conftest import moving_texture
from test_injection import SD15_BLOCKS, small_unet


def tokens(batch: int, length: int, channels: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, channels, generator=generator) for _ in range(3)]


def test_a_merged_token_weighs_as_the_tokens_it_stands_for():
    """Keys/values that come in identical pairs lose nothing when half of them merge: each pair
    becomes one token counted twice (proportional attention), so the attention is the unmerged one."""
    query, key, value = tokens(4, 64, 32, seed=0)  # two CFG halves of two keyframes
    key, value = key[:, ::2].repeat_interleave(2, dim=1), value[:, ::2].repeat_interleave(2, dim=1)
    merged_key, _, log_size = merge_tokens(key, value, 0.5)
    assert merged_key.shape == (4, 32, 32) and torch.allclose(log_size.exp().sum(dim=1), torch.full((4,), 64.0))
    whole = extended_attention(query, key, value, heads=4, group=2)
    torch.testing.assert_close(extended_attention(query, key, value, heads=4, group=2, merge=0.5), whole)


def test_merging_changes_only_what_the_other_keyframes_give():
    query, key, value = tokens(4, 64, 32, seed=1)
    whole = extended_attention(query, key, value, heads=4, group=2)
    merged = extended_attention(query, key, value, heads=4, group=2, merge=0.5)
    assert (merged - whole).abs().max() > 1e-2  # random tokens share nothing: merging them is felt
    # Alone (group 1) a frame has no other keyframe: merging does nothing, bit for bit.
    heads = [x.reshape(4, 64, 4, 8).transpose(1, 2) for x in (query, key, value)]
    plain = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(4, 64, 32)
    assert torch.equal(extended_attention(query, key, value, heads=4, group=1, merge=0.5), plain)


def test_merging_acts_on_the_unets_highest_resolution_layers():
    names = list(small_unet(0, (32, 32, 32, 32), **SD15_BLOCKS).attn_processors)
    expected = {f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn1.processor" for i in range(2)}
    expected |= {f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1.processor" for i in range(3)}
    assert highest_resolution_layers(names) == expected


def test_attention_merge_is_a_setting_off_by_default(tiny_pipe, one_thread):
    assert EditSettings(prompt="x").attention_merge == 0.0
    with pytest.raises(SettingError):
        EditSettings(prompt="x", attention_merge=0.6)  # ToMe's bound: one half merged into the other
    frames = moving_texture(10)  # two keyframes per step, so extended attention has other keyframes
    settings = dict(prompt="a face with eyeglasses", steps=2, seed=1, identity_gradient=0.0)
    default = tiny_pipe(frames, EditSettings(**settings)).frames
    assert not np.array_equal(tiny_pipe(frames, EditSettings(**settings, attention_merge=0.5)).frames, default)


@torch.no_grad()
@pytest.mark.parametrize("merge", [0.0, 0.5])
def test_query_chunks_bound_the_score_matrix_and_keep_the_result(merge, monkeypatch, one_thread):
    """A tiny UNet's keyframe pass, its self-attention scores capped at 2**20 per call: the same
    noise prediction to float32 rounding (1e-6 absolute), no call past the cap."""
    unet = small_unet(0, (32, 64))
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))  # 2 keyframes × CFG
    text = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(3))
    sdpa, largest = F.scaled_dot_product_attention, []

    def counted(query, key, value, *args, **kwargs):
        largest.append(query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2])
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    predictions = {}
    for cap in (2**40, 2**20):
        controller = FeatureController(mode="edit", group=2, merge=merge, chunk_scores=cap)
        largest.clear()
        with feature_hooks([unet], controller):
            predictions[cap] = unet(latents, torch.tensor(500), encoder_hidden_states=text).sample
        peaks = max(largest), len(largest)
        if cap == 2**40:
            whole_peak, whole_calls = peaks
    assert whole_peak > 2**20  # the whole 512 × 512 scores of each head and group pass the cap ...
    assert peaks[0] <= 2**20 and peaks[1] > whole_calls  # ... and in chunks no call holds more
    torch.testing.assert_close(predictions[2**20], predictions[2**40], atol=1e-6, rtol=1e-5)
