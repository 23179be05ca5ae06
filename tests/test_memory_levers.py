"""The memory levers of #35: VAE calls on few frames, latents kept only when asked, and the
per-stage peak memory the benchmarks report (benchmarks/edit_speed.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ipfacediff.diffusion import InversionCache, StageTimer, decode_latents, observing_stages
from ipfacediff.editing import STAGES
from ipfacediff.settings import EditSettings

from conftest import moving_texture
from test_long_video import drifting

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(prompt="a face with eyeglasses", steps=3, identity_gradient=0.0)


def vae_batches(vae: torch.nn.Module) -> tuple[list[int], list]:
    """The batch of every encoder and decoder call of ``vae`` while the handles live."""
    seen: list[int] = []
    hooks = [
        part.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
        for part in (vae.encoder, vae.decoder)
    ]
    return seen, hooks


def test_vae_batch_size_bounds_the_vae_calls_and_leaves_the_edit_unchanged(tiny_pipe, tmp_path):
    frames = moving_texture(10)
    settings = EditSettings(**SETTINGS)
    reference = tiny_pipe(frames, settings, cache=InversionCache(tmp_path / "a"), vae_batch_size=8)
    seen, hooks = vae_batches(tiny_pipe.vae)
    try:
        sliced = tiny_pipe(frames, settings, cache=InversionCache(tmp_path / "b"), vae_batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    # encode, decode and the reconstruction's decode, two frames at a time (one frame alone takes
    # other CPU kernels: a rounding apart)
    assert seen and max(seen) == 2 and len(seen) >= 3 * len(frames) // 2
    assert np.array_equal(sliced.frames, reference.frames)
    assert torch.equal(sliced.latents, reference.latents)


def test_latents_are_kept_only_when_asked_and_are_what_the_frames_decode_from(tiny_pipe, tmp_path):
    frames = drifting(40)
    settings = EditSettings(**SETTINGS, window=32, detail_transfer=False)
    kept = tiny_pipe(frames, settings, cache=InversionCache(tmp_path / "cache"))
    assert kept.windows > 1
    # one tensor of the clip's final latents, filled window by window
    assert kept.latents.shape == (len(frames), 4, 8, 8)
    assert np.array_equal(decode_latents(tiny_pipe.vae, kept.latents), kept.frames)
    dropped = tiny_pipe(frames, settings, cache=InversionCache(tmp_path / "cache"), latents=False)
    assert dropped.latents is None
    assert np.array_equal(dropped.frames, kept.frames)


def test_identity_guidance_recomputes_the_decoder_in_its_backward_for_the_same_gradient(tiny_pipe):
    from ipfacediff.editing.guidance import identity_gradient

    vae, net = tiny_pipe.vae, tiny_pipe.identity_net()
    point = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    target = torch.nn.functional.normalize(torch.randn(1, 128, generator=torch.Generator().manual_seed(4)), dim=-1)
    with torch.enable_grad():  # the gradient with every activation kept
        leaf = point.clone().requires_grad_(True)
        image = vae.decode(leaf / vae.config.scaling_factor).sample.float().clamp(-1, 1)
        torch.nn.functional.cosine_similarity(net(image), target, dim=-1).sum().backward()
    runs: list[int] = []
    hook = vae.decoder.mid_block.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        gradient, _ = identity_gradient(vae, net, point, target)
    finally:
        hook.remove()
    assert len(runs) == 2  # forward, and again in the backward
    assert torch.equal(gradient, leaf.grad)
    assert not vae.is_gradient_checkpointing  # left as it was


def test_an_observer_is_told_of_every_stage_as_it_begins_and_ends(tiny_pipe, tmp_path):
    events: list[tuple[str, bool]] = []
    with observing_stages(lambda stage, entering: events.append((stage, entering))):
        result = tiny_pipe(moving_texture(6), EditSettings(**SETTINGS), cache=InversionCache(tmp_path / "c"))
    told = len(events)
    open_stages: list[str] = []
    for stage, entering in events:
        if entering:
            open_stages.append(stage)
        else:  # each end closes the innermost open stage of its name
            assert stage in open_stages
            del open_stages[len(open_stages) - 1 - open_stages[::-1].index(stage)]
    assert not open_stages
    ran = {stage for stage, seconds in result.timings.items() if seconds > 0}
    assert ran and ran <= {stage for stage, _ in events} <= set(STAGES)
    with StageTimer()("decode"):  # a closed observer hears nothing more
        pass
    assert len(events) == told


def edit_speed():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import edit_speed

    return edit_speed


def test_peak_memory_per_stage_counts_a_stage_inside_another_in_both():
    bench = edit_speed()
    timer = StageTimer("cpu")
    size = 200 * 2**20
    with bench.PeakMemory(torch.device("cpu")) as memory:
        with timer("decode"):
            with timer("encode"):
                block = np.ones(size // 8)  # written: resident
                del block
        with timer("mask"):
            pass
    stages = memory.stages
    assert stages["encode"] >= 0.9 * size and stages["decode"] >= stages["encode"]
    assert stages["mask"] < 0.25 * size
    assert memory.peak >= stages["decode"]


def test_live_bytes_counts_the_tensors_alive_at_once_without_computing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    bench = edit_speed()
    megabyte = 2**20
    with FakeTensorMode():
        x = torch.empty(megabyte // 4)  # made before: not counted
        with bench.LiveBytes() as live:
            y = x * 2  # 1 MB
            z = y + 1  # 2 MB alive
            del y
            w = z.view(-1) * 3  # y freed, the view shares z: 2 MB again
            del z, w
        assert live.peak == 2 * megabyte and live.live == 0
