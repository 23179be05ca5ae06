"""ε1's features into ε2 as plug-and-play and TokenFlow define them, and correspondence features
that keep a 320-channel decoder's nearest neighbours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel

from ipfacediff.diffusion import InversionCache, invert_frames, join_inverted
from ipfacediff.diffusion.inversion import capture_output
from ipfacediff.editing import (
    FeatureController,
    feature_hooks,
    nearest_neighbour_field,
    residual_injection_block,
)
from ipfacediff.editing.hooks import injected_attention_layers
from ipfacediff.models.loading import SD1_SCHEDULER_CONFIG

SD15_BLOCKS = dict(
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def small_unet(seed: int, channels: tuple[int, ...] = (32, 64), **blocks) -> UNet2DConditionModel:
    """A random UNet2DConditionModel of SD-1.x's kind, small but for ``channels``."""
    torch.manual_seed(seed)
    blocks = blocks or dict(
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=channels,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=min(32, channels[0]),
        **blocks,
    ).eval()


@pytest.fixture(scope="module")
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@torch.no_grad()
def test_residual_injection_gives_the_editor_the_guides_whole_block_output(threads):
    """ε1's output of the injection resnet, shortcut included, replaces ε2's (not only the residual
    branch as in PnP: that lost identity on FaceWorld, benchmarks/README.md session 15)."""
    guide, editor = small_unet(0, (32, 64)), small_unet(1, (32, 64))
    resnet_guide = residual_injection_block(guide)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(600)
    controller = FeatureController()
    with feature_hooks([guide, editor], controller):
        with capture_output(resnet_guide) as guide_out:
            controller.mode = "capture"
            guide(latents, t, encoder_hidden_states=text.expand(2, -1, -1))
        after_resnet = []  # what the resnet hands on: the input of the attention that follows it
        handle = (
            editor.up_blocks[1]
            .attentions[1]
            .register_forward_pre_hook(lambda _m, inputs: after_resnet.append(inputs[0]))
        )
        with capture_output(editor.up_blocks[-1]) as edit_last:
            controller.mode, controller.inject_features = "edit", True
            injected = editor(torch.cat([latents, latents]), t, encoder_hidden_states=text.expand(4, -1, -1)).sample
        handle.remove()
        with capture_output(editor.up_blocks[-1]) as plain_last:
            controller.inject_features = False
            plain = editor(torch.cat([latents, latents]), t, encoder_hidden_states=text.expand(4, -1, -1)).sample
    torch.testing.assert_close(controller.residual, guide_out[0])
    # What the resnet hands on is ε1's output, for both halves of the CFG batch, shortcut included.
    assert residual_injection_block(editor) is editor.up_blocks[1].resnets[1]
    torch.testing.assert_close(after_resnet[0], guide_out[0].repeat(2, 1, 1, 1))
    assert not torch.allclose(edit_last[0], plain_last[0]) and not torch.allclose(injected, plain)


def test_attention_is_injected_where_tokenflow_injects_it():
    unet = small_unet(0, (32, 32, 32, 32), **SD15_BLOCKS)
    names = list(unet.attn_processors)
    tokenflow = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}
    expected = {
        f"up_blocks.{block}.attentions.{i}.transformer_blocks.0.attn1.processor"
        for block, layers in tokenflow.items()
        for i in layers
    }
    assert injected_attention_layers(names) == expected
    decoder = [n for n in names if n.startswith("up_blocks") and n.endswith("attn1.processor")]
    assert len(decoder) == 9 and len(expected) == 8


@torch.no_grad()
def test_capture_records_only_the_injected_layers(threads):
    unet = small_unet(0, (32, 32, 32, 32), **SD15_BLOCKS)
    controller = FeatureController(mode="capture")
    with feature_hooks([unet], controller):
        unet(torch.randn(1, 4, 16, 16), torch.tensor(500), encoder_hidden_states=torch.zeros(1, 77, 32))
    assert set(controller.queries_keys) == injected_attention_layers(list(unet.attn_processors))
    assert not any(".attentions.0." in n and n.startswith("up_blocks.1.") for n in controller.queries_keys)


def shifted_latents(count: int, side: int = 16, seed: int = 1) -> torch.Tensor:
    """Latents of one smooth random texture moving a row per frame."""
    base = torch.randn(1, 4, side + count + 8, side + 8, generator=torch.Generator().manual_seed(seed))
    base = F.avg_pool2d(base, 5, 1, 2) * 3
    return torch.stack([base[0, :, 4 + i : 4 + i + side, 4 : 4 + side] for i in range(count)])


@torch.no_grad()
def full_features(unet: UNet2DConditionModel, inverted, clean: torch.Tensor, step: int) -> torch.Tensor:
    """The decoder features the inversion projected at ``step``, computed again in full: (N, L, C)."""
    source = inverted.latents[step + 1] if step + 1 < len(inverted.latents) else clean
    with capture_output(unet.up_blocks[-1]) as captured:
        unet(source, inverted.timesteps[step], encoder_hidden_states=torch.zeros(len(source), 77, 32))
    return captured[0].flatten(2).transpose(1, 2)


def neighbour_agreement(features: torch.Tensor, full: torch.Tensor, frames: list[int], key: int) -> float:
    """Share of the tokens of ``frames`` whose nearest neighbour in frame ``key`` is the one the
    full features give."""
    side = int(full.shape[1] ** 0.5)

    def field(x: torch.Tensor) -> torch.Tensor:
        return nearest_neighbour_field(x[frames], x[[key] * len(frames)], side=side)

    return (field(features) == field(full)).float().mean().item()


@torch.no_grad()
def test_projected_features_keep_the_nearest_neighbours_of_320_channels(threads, tmp_path):
    unet = small_unet(0, (320, 320))
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    clean, empty = shifted_latents(4), torch.zeros(1, 77, 32)
    cache = InversionCache(tmp_path)
    inverted = invert_frames(unet, scheduler, clean, empty, steps=2, feature_steps=[0, 1], cache=cache, cache_key="a")
    random_map = torch.linalg.qr(torch.randn(320, 64, generator=torch.Generator().manual_seed(0))).Q
    for step, features in inverted.features.items():
        assert features.shape == (4, 256, 64) and features.dtype == torch.float16
        full = full_features(unet, inverted, clean, step)
        ours = neighbour_agreement(features, full, [1, 2, 3], 0)
        old = neighbour_agreement((full @ random_map).half(), full, [1, 2, 3], 0)
        print(f"step {step}: nearest neighbours kept by the fitted basis {ours:.3f}, by a random map {old:.3f}")
        assert ours >= 0.94 and ours > old
    # The cache gives back the same features in the same basis.
    again = invert_frames(unet, scheduler, clean, empty, steps=2, feature_steps=[0, 1], cache=cache, cache_key="a")
    assert again.unet_calls == 0
    for step in inverted.features:
        assert torch.equal(again.features[step], inverted.features[step])
        assert torch.equal(again.feature_bases[step], inverted.feature_bases[step])


@torch.no_grad()
def test_chunks_fitted_apart_are_joined_in_one_basis(threads):
    unet = small_unet(0, (320, 320))
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    clean, empty = shifted_latents(4), torch.zeros(1, 77, 32)

    def piece(begin: int, end: int):
        return begin, end, invert_frames(unet, scheduler, clean[begin:end], empty, steps=2, feature_steps=[0])

    first, second = piece(0, 2), piece(2, 4)
    assert not torch.equal(first[2].feature_bases[0], second[2].feature_bases[0])
    joined = join_inverted(iter([first, second]), 4)
    basis = joined.feature_bases[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(64), atol=1e-5, rtol=0)
    whole = invert_frames(unet, scheduler, clean, empty, steps=2, feature_steps=[0])
    full = full_features(unet, whole, clean, 0)
    # Frames of the second chunk find their neighbours in a keyframe of the first.
    shared = neighbour_agreement(joined.features[0], full, [2, 3], 0)
    apart = neighbour_agreement(
        torch.cat([first[2].features[0], second[2].features[0]]), full, [2, 3], 0
    )  # each chunk left in its own basis
    print(f"across chunks: joined basis {shared:.3f}, bases left apart {apart:.3f}")
    assert shared >= 0.9 and shared > apart + 0.2
