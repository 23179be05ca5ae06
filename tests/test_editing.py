from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ipfacediff.diffusion import InversionCache, ddim_step, encode_prompt
from ipfacediff.errors import UserError
from ipfacediff.face import inner_face_share
from ipfacediff.settings import EditSettings
from ipfacediff.editing import (
    DEFAULT_KEYFRAME_SPACING,
    FeatureController,
    IPFaceDiffAttnProcessor,
    IPFaceDiffPipeline,
    extended_attention,
    local_blend_mask,
    mask_reference_prompt,
    transfer_detail,
    keyframe_batches,
    nearest_neighbour_field,
    propagate_by_nearest_neighbour,
    smooth_over_time,
    select_keyframes,
    two_nearest,
)

from conftest import moving_texture

PROMPT = "a face with eyeglasses"


def test_same_seed_gives_bit_identical_output(tiny_pipe, tmp_path):
    frames = moving_texture(6)
    a = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, seed=3), cache=InversionCache(tmp_path / "a"))
    b = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, seed=3), cache=InversionCache(tmp_path / "b"))
    assert np.array_equal(a.frames, b.frames)
    # and a re-edit from the cache is the same edit, made without inverting again
    c = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, seed=3), cache=InversionCache(tmp_path / "a"))
    assert c.inversion_reused and c.unet_calls["invert"] == 0
    assert np.array_equal(a.frames, c.frames)
    d = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, seed=4), cache=InversionCache(tmp_path / "a"))
    assert a.keyframes_per_step != d.keyframes_per_step


def test_single_keyframe_extended_attention_is_plain_self_attention(tiny_pipe):
    name, attn = next((n, m) for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn1"))
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    controller = FeatureController(mode="edit", group=1)
    ours = IPFaceDiffAttnProcessor(name, controller, injectable=True)(attn, hidden)
    plain = AttnProcessor2_0()(attn, hidden)
    torch.testing.assert_close(ours, plain)
    # With two keyframes each frame attends to both: differs from plain unless the frames agree.
    controller.group = 2
    assert not torch.allclose(IPFaceDiffAttnProcessor(name, controller, True)(attn, hidden), plain)
    same = hidden[:1].repeat(2, 1, 1)
    torch.testing.assert_close(
        IPFaceDiffAttnProcessor(name, controller, True)(attn, same), AttnProcessor2_0()(attn, same)
    )


def test_extended_attention_attends_across_the_group():
    q = torch.randn(4, 5, 8)
    k = torch.randn(4, 5, 8)
    v = torch.randn(4, 5, 8)
    joint = extended_attention(q, k, v, heads=2, group=2)
    reference = (
        torch.nn.functional.scaled_dot_product_attention(
            q.reshape(2, 10, 2, 4).transpose(1, 2),
            k.reshape(2, 10, 2, 4).transpose(1, 2),
            v.reshape(2, 10, 2, 4).transpose(1, 2),
        )
        .transpose(1, 2)
        .reshape(4, 5, 8)
    )
    torch.testing.assert_close(joint, reference)


def test_correspondence_recovers_a_known_shift(tiny_pipe):
    """One texture shifted 8 px (2 latent tokens) per frame: nearest neighbours must undo the shift."""
    frames = moving_texture(3, size=128, shift=(8, 0))
    inverted, _ = tiny_pipe.invert(frames, steps=10)
    side, offset = 128 // 4, 2 * 2  # frame 2 is shifted by 4 tokens from frame 0
    ys, xs = np.divmod(np.arange(side * side), side)
    target = ys * side + xs + offset
    # Tokens whose match exists in the keyframe, away from the zero-padded border ring, where a
    # random conv net's features are dominated by the padding.
    inner = (xs >= 1) & (ys >= 1) & (ys < side - 1) & (xs + offset < side - 1)
    for step in (3, 9):
        field = nearest_neighbour_field(inverted.features_at(step)[2], inverted.features_at(step)[0], side=side).numpy()
        accuracy = (field[inner] == target[inner]).mean()
        assert accuracy >= 0.9, (step, accuracy)


def test_soft_propagation_blends_near_ties_and_sharpens_to_the_nearest_token():
    """A follower token whose features lie between two keyframe tokens takes a blend of their
    edits under a temperature, the nearer one's as the temperature falls, exactly it at 0."""
    side, dim = 4, 8
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(side * side, dim, generator=generator)
    follower = key.clone()
    follower[5] = 0.55 * key[5] + 0.45 * key[6]  # nearer token 5, but close to a tie with token 6
    features = torch.stack([key, follower])
    edit = torch.arange(side * side, dtype=torch.float32).reshape(1, side, side).repeat(2, 1, 1)
    hard = propagate_by_nearest_neighbour({0: edit}, features, 2)[1]
    assert torch.equal(hard, edit)  # the follower's own tokens match their keyframe twins
    soft = propagate_by_nearest_neighbour({0: edit}, features, 2, temperature=0.05)[1, 0]
    sharp = propagate_by_nearest_neighbour({0: edit}, features, 2, temperature=0.002)[1, 0]
    token = soft.reshape(-1)[5]
    assert 5.0 < token < 6.0  # a convex blend, tilted to neither extreme alone
    assert abs(sharp.reshape(-1)[5] - 5.0) < abs(token - 5.0)
    assert soft.min() >= 0 and soft.max() <= side * side - 1  # never outside the keyframe's edits


def test_smoothing_over_time_damps_flicker_and_keeps_a_steady_edit():
    steady = torch.full((6, 4, 2, 2), 0.7)
    assert torch.equal(smooth_over_time(steady, 0.25), steady)
    flicker = steady + 0.1 * torch.tensor([1.0, -1, 1, -1, 1, -1]).reshape(6, 1, 1, 1)
    smoothed = smooth_over_time(flicker, 0.25)
    frame_to_frame = lambda x: (x[1:] - x[:-1]).abs().mean()  # noqa: E731
    assert frame_to_frame(smoothed) < 0.5 * frame_to_frame(flicker)
    assert torch.allclose(smoothed[1:-1].mean(), steady.mean())  # the edit is spread, not lost
    assert torch.equal(smooth_over_time(flicker, 0.0), flicker)
    assert torch.equal(smooth_over_time(flicker[:2], 0.25), flicker[:2])


def test_repeated_frame_gives_identical_frames(tiny_pipe):
    frame = moving_texture(1)[0]
    result = tiny_pipe(np.stack([frame] * 10), EditSettings(prompt=PROMPT, steps=3, keyframes=3))
    assert all(np.array_equal(result.frames[0], f) for f in result.frames[1:])


def test_every_length_up_to_twice_the_keyframe_spacing(tiny_pipe):
    frames = moving_texture(2 * DEFAULT_KEYFRAME_SPACING, size=32)
    for length in range(1, 2 * DEFAULT_KEYFRAME_SPACING + 1):
        result = tiny_pipe(frames[:length], EditSettings(prompt=PROMPT, steps=2, seed=length))
        assert result.frames.shape == (length, 32, 32, 3)
        assert all(max(k) < length for k in result.keyframes_per_step)


def test_without_injection_every_frame_editing_is_independent_sampling(tiny_pipe):
    """Injection and identity guidance off, every frame a keyframe: plain CFG DDIM sampling with ε2
    from the inversion."""
    frames = moving_texture(3)
    steps, guidance = 4, 5.0
    result = tiny_pipe(
        frames,
        EditSettings(
            prompt=PROMPT,
            steps=steps,
            guidance=guidance,
            every_frame=True,
            inject_feature_until=1000,
            inject_attention_until=1000,
            local_blend=False,
            detail_transfer=False,
            identity_gradient=0.0,
        ),
    )
    inverted, _ = tiny_pipe.invert(frames, steps=steps)
    texts = encode_prompt(tiny_pipe.tokenizer, tiny_pipe.text_encoder, ["", PROMPT])
    latents = inverted.latents[0].clone()
    with torch.no_grad():
        for step, t in enumerate(inverted.timesteps):
            for i in range(len(latents)):  # one frame at a time: truly independent
                x = latents[i : i + 1].repeat(2, 1, 1, 1)
                uncond, cond = tiny_pipe.unet(x, t, encoder_hidden_states=texts).sample.chunk(2)
                latents[i] = ddim_step(latents[i], (uncond + guidance * (cond - uncond))[0], *inverted.alphas[step])
    reference = tiny_pipe.vae.decode(latents / tiny_pipe.vae.config.scaling_factor).sample
    reference = ((reference.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(result.frames.astype(int) - reference.astype(int)).max() <= 1


def test_identity_features_change_the_edit(tiny_pipe):
    frames = moving_texture(4)
    with_injection = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4))
    without = tiny_pipe(
        frames, EditSettings(prompt=PROMPT, steps=4, inject_feature_until=1000, inject_attention_until=1000)
    )
    ablated = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, feature_injection=False))
    assert with_injection.unet_calls["identity"] > 0 and without.unet_calls["identity"] == 0
    assert not np.array_equal(with_injection.frames, without.frames)
    assert ablated.frames.shape == with_injection.frames.shape


def test_keyframes_are_spread_and_batches_share_an_anchor():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        chosen = select_keyframes(40, 5, generator=generator)
        assert len(chosen) == 5 and np.all(np.diff(chosen) >= 7)
    assert select_keyframes(40, 5) == [4, 12, 20, 28, 36]
    batches = keyframe_batches(list(range(0, 160, 8)), 8, anchored=True)
    assert max(len(b) for b in batches) <= 8
    assert all(b[0] == 0 for b in batches)
    assert sorted({k for b in batches for k in b}) == list(range(0, 160, 8))
    assert two_nearest(5, [0, 8, 16]) == [(8, 5 / 8), (0, 3 / 8)]
    assert two_nearest(3, [3]) == [(3, 1.0)]


def test_keyframes_are_drawn_from_the_frames_that_may_be_keyframes():
    """Frames 10-19 are behind a board: the keyframes spread over the other 30, evenly."""
    seen = [f for f in range(40) if not 10 <= f < 20]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        chosen = select_keyframes(40, 5, generator=generator, candidates=seen)
        assert len(chosen) == 5 and set(chosen) <= set(seen)
    assert select_keyframes(40, 5, candidates=seen) == [3, 9, 25, 31, 37]
    assert select_keyframes(40, 5, candidates=range(40)) == select_keyframes(40, 5)
    assert select_keyframes(40, 5, candidates=[]) == select_keyframes(40, 5)  # all hidden: as without


def test_pipeline_saves_and_loads(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = IPFaceDiffPipeline.from_pretrained(tmp_path / "pipe")
    frames = moving_texture(3)
    a = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=2))
    b = loaded(frames, EditSettings(prompt=PROMPT, steps=2))
    assert np.array_equal(a.frames, b.frames)


def test_bad_frames_are_rejected(tiny_pipe):
    with pytest.raises(ValueError):
        tiny_pipe(np.zeros((0, 64, 64, 3), np.uint8), EditSettings(prompt=PROMPT))
    with pytest.raises(ValueError):
        tiny_pipe(np.zeros((2, 64, 64, 3), np.float32), EditSettings(prompt=PROMPT))


def test_detail_transfer_restores_the_source_where_the_edit_changed_nothing():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    reconstruction = np.clip(source.astype(int) + rng.integers(-6, 7, source.shape), 0, 255).astype(np.uint8)
    edited = reconstruction.copy()
    edited[:, 20:44, 20:44] = 255 - edited[:, 20:44, 20:44] // 4  # a strong edit in the middle
    out = transfer_detail(source, edited, reconstruction)
    assert np.array_equal(out[:, :12], source[:, :12])  # far from the edit: the source, exactly
    assert np.array_equal(out[:, 26:38, 26:38], edited[:, 26:38, 26:38])  # inside it: the edit alone
    assert np.array_equal(transfer_detail(source, reconstruction, reconstruction), source)


@pytest.mark.parametrize("size", [16, 64, 200])
def test_detail_transfer_matches_a_blur_done_with_opencv(size):
    """The torch arithmetic (run on the pipeline's device) against the same rule written with
    OpenCV's Gaussian blur, on a picture with a soft-edged edit so the fade is exercised."""
    import cv2

    rng = np.random.default_rng(size)
    source = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    reconstruction = np.clip(source.astype(int) + rng.integers(-8, 9, source.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    bump = 60 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (2 * (size / 6) ** 2))
    edited = np.clip(reconstruction + bump[None, ..., None], 0, 255).astype(np.uint8)
    src, out, rec = (a.astype(np.float32) for a in (source, edited, reconstruction))
    sigma = max(0.5, size / 64)
    change = np.stack([cv2.GaussianBlur(np.abs(o - r).max(axis=-1), (0, 0), sigma) for o, r in zip(out, rec)])
    keep = np.clip(1.0 - change / 24.0, 0.0, 1.0)[..., None]
    expected = np.clip(out + keep * (src - rec), 0, 255).round().astype(np.uint8)
    got = transfer_detail(source, edited, reconstruction, batch_size=2)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert np.mean(got != expected) < 0.01


def test_mask_reference_is_the_source_prompt_or_the_subject():
    assert mask_reference_prompt("a face with eyeglasses") == "a face with"
    assert mask_reference_prompt("A smiling face!") == "a face"
    assert mask_reference_prompt("a face with a beard and eyeglasses", "a face with a beard") == "a face with a beard"


def test_local_blend_mask_covers_the_peak_and_spares_the_rest():
    difference = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    difference[:, :, 6:9, 6:9] += 1.0
    mask = local_blend_mask(difference, 0.5)
    assert mask.shape == difference.shape and mask.min() >= 0 and mask.max() <= 1
    assert (mask[:, :, 6:9, 6:9] == 1).all()  # the region, then its one-token dilation, softened
    assert (mask[:, :, 5:10, 5:10] > 0.4).all()
    assert mask[:, :, :3].sum() == 0 and mask[:, :, :, 13:].sum() == 0


def test_local_blend_mask_filtered_over_time_stops_a_border_token_blinking():
    difference = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.2
    difference[:, :, 6:9, 6:9] += 1.0  # the edit's core, every frame
    difference[::2, :, 3, 12] = 0.7  # a token just above the threshold in every other frame
    difference[1::2, :, 3, 12] = 0.2  # and well below it in the rest
    alone = local_blend_mask(difference, 0.5)[:, 0, 3, 12]
    filtered = local_blend_mask(difference, 0.5, temporal_smoothing=0.25)[:, 0, 3, 12]
    assert alone[::2].min() == 1 and alone[1::2].max() < 1  # blinks frame by frame
    assert filtered[1:-1].max() - filtered[1:-1].min() < 0.1  # steady between the ends
    assert (local_blend_mask(difference, 0.5, temporal_smoothing=0.25)[:, :, 6:9, 6:9] == 1).all()


class HalfMaskPipeline(IPFaceDiffPipeline):
    """The tiny pipeline with the edit's region fixed to the left half of the latent grid."""

    def edit_region_masks(self, inverted, *args, **kwargs):
        mask = torch.zeros(len(inverted.clean), 1, *inverted.clean.shape[-2:])
        mask[..., : mask.shape[-1] // 2] = 1
        return mask


def test_local_blend_keeps_the_edit_inside_its_region(tiny_pipe):
    frames = moving_texture(3)
    inverted, _ = tiny_pipe.invert(frames, steps=4)
    masks = tiny_pipe.edit_region_masks(inverted, PROMPT, "a face", {})
    assert masks.shape == (3, 1, 16, 16) and 0 <= masks.min() and masks.max() <= 1
    half = HalfMaskPipeline(**tiny_pipe.components, edit_adapter_weights={}, model_source="tiny")
    blended = half(frames, EditSettings(prompt=PROMPT, steps=4))
    free = tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, local_blend=False))
    assert blended.unet_calls["mask"] > 0 and free.unet_calls["mask"] == 0
    # Outside the region the latents are the source's own, exactly; inside they are edited.
    assert torch.equal(blended.latents[..., 8:], inverted.clean[..., 8:])
    assert not torch.allclose(blended.latents[..., :8], inverted.clean[..., :8], atol=1e-3)
    assert not torch.allclose(free.latents[..., 8:], inverted.clean[..., 8:], atol=1e-3)


class WholeMaskPipeline(IPFaceDiffPipeline):
    """The tiny pipeline with the edit's region the whole latent grid."""

    def edit_region_masks(self, inverted, *args, **kwargs):
        return torch.ones(len(inverted.clean), 1, *inverted.clean.shape[-2:])


def test_a_hair_edit_keeps_the_inner_face(tiny_pipe):
    frames = moving_texture(3)
    whole = WholeMaskPipeline(**tiny_pipe.components, edit_adapter_weights={}, model_source="tiny")
    inverted, _ = whole.invert(frames, steps=4)
    inner = torch.from_numpy(inner_face_share(16)) == 1
    hair = whole(frames, EditSettings(prompt="a face with blonde hair", steps=4, hair=True))
    plain = whole(frames, EditSettings(prompt="a face with blonde hair", steps=4))
    assert hair.hair and not plain.hair
    assert inner.sum() > 30
    assert torch.equal(hair.latents[..., inner], inverted.clean[..., inner])  # brows to mouth: the source's
    assert not torch.allclose(hair.latents[..., ~inner], inverted.clean[..., ~inner], atol=1e-3)
    assert not torch.allclose(plain.latents[..., inner], inverted.clean[..., inner], atol=1e-3)
    whole_frame = whole(frames, EditSettings(prompt="a face with blonde hair", steps=4, hair=True, whole_frame=True))
    plain_whole_frame = whole(frames, EditSettings(prompt="a face with blonde hair", steps=4, whole_frame=True))
    assert whole_frame.hair and torch.equal(whole_frame.latents, plain_whole_frame.latents)  # no face layout to lean on


def test_steps_below_all_keyframes_below_edit_every_frame_on_its_own_latents(tiny_pipe):
    frames = moving_texture(6)
    run = lambda keyframes=2, **kw: tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, keyframes=keyframes, **kw))  # noqa: E731
    # the timesteps are 751, 501, 251 and 1
    late = run(all_keyframes_below=500)
    assert [len(k) for k in late.keyframes_per_step] == [2, 2, 6, 6]
    assert not np.array_equal(late.frames, run().frames)
    assert np.array_equal(run(all_keyframes_below=1000).frames, run(keyframes=6).frames)  # every step: all keyframes


def test_temporal_smoothing_changes_aligned_keyframe_edits_only(tiny_pipe):
    frames = moving_texture(5)
    run = lambda **kw: tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=3, local_blend=False, **kw)).latents  # noqa: E731
    smoothed, raw = run(temporal_smoothing=0.25), run(temporal_smoothing=0.0)
    assert not torch.allclose(smoothed, raw, atol=1e-4)
    assert torch.equal(run(temporal_smoothing=0.25, whole_frame=True), run(temporal_smoothing=0.0, whole_frame=True))
    assert torch.equal(run(temporal_smoothing=0.25, every_frame=True), run(temporal_smoothing=0.0, every_frame=True))
    with pytest.raises(UserError, match="--temporal-smoothing"):
        run(temporal_smoothing=0.5)
