"""Seconds per stage, UNet evaluations, FLOPs and peak memory of an edit: the full method,
--every-frame, a re-edit, and identity guidance while sampling.

    python benchmarks/edit_speed.py --json OUT.json                       # tiny models, CPU
    python benchmarks/edit_speed.py --full-size --device cuda --json OUT.json   # SD-1.5 architecture, fp16, 512²
    python benchmarks/edit_speed.py --full-size --device cuda --compile --plan full:40,reedit:40,full:160
    python benchmarks/edit_speed.py --full-size --device cpu --plan identity_call:1   # one identity-guidance call
    python benchmarks/edit_speed.py --full-size --device cuda --shared-unet --plan full:40,reedit:40

--full-size builds the real SD-1.5 configurations with random weights (no download: timing does
not depend on the weights); ε1 and ε2 are two separate UNets, as with two fine-tuned models, or
with --shared-unet LoRA adapters over one UNet, as a model set with an identity LoRA loads.
Peak memory is reported per stage too ("peak_memory_mb_per_stage": the allocator's peak on a GPU,
the resident set's growth on the CPU), and every run ends with an accounting of SD-1.5's memory
computed on the CPU ("sd15_accounting": weights, each model call's activations under fake
tensors, the host's share), so a memory budget can be reasoned about without a GPU.
Cost that does not depend on the machine is counted too: UNet evaluations (one frame through one
UNet, the two halves of classifier-free guidance two) per edited frame, and the FLOPs of one
evaluation and of one identity-guidance call (VAE decoder forward and backward), counted by
torch's FlopCounterMode on shape-only (meta) copies of the models' configurations: convolutions,
matrix products and attention, the rest (norms, activations) left out. An evaluation in a
keyframe batch costs a little more than counted: its self-attention spans the batch's frames.
Prints a table and writes JSON with a top-level "ratios" object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfacediff.diffusion import (  # noqa: E402
    FEATURE_DIM,
    InversionCache,
    decoder_checkpointing,
    frames_digest,
    observing_stages,
)
from ipfacediff.editing import (  # noqa: E402
    ANCHOR_KEYFRAMES,
    DEFAULT_KEYFRAME_BATCH,
    DEFAULT_VAE_BATCH,
    STAGES,
    IPFaceDiffPipeline,
)
from ipfacediff.editing.propagation import propagate_by_nearest_neighbour, squared_distances  # noqa: E402
from ipfacediff.models import (  # noqa: E402
    IDENTITY_ADAPTER,
    SD1_SCHEDULER_CONFIG,
    build_tiny_models,
    clip_bpe_tokenizer,
    compile_unets,
    load_model_set,
)
from ipfacediff.settings import DEFAULT_WINDOW, EditSettings  # noqa: E402

# The first edit's prompt, and a re-edit's: the same clip edited again with another prompt.
PROMPT = "a face with eyeglasses"
REEDIT_PROMPT = "a face with blonde hair"

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# SD-1.5's shapes where they reach host memory (512² crops, 4×64×64 latents, the last decoder
# block's 64² tokens with at least 64 channels, so 64 projected feature dims) at narrow widths:
# cheap enough for a thousand frames on a CPU. No attention at 64² tokens (its cost, not its shape).
NARROW_UNET = SD15_UNET | dict(
    layers_per_block=1,
    cross_attention_dim=32,
    block_out_channels=(64, 32, 32, 32),
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
NARROW_VAE = SD15_VAE | dict(
    layers_per_block=1, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, mid_block_add_attention=False
)
NARROW_TEXT = SD15_TEXT | dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def full_size_pipeline(
    device: torch.device,
    dtype: torch.dtype,
    *,
    unets: torch.device | None = None,
    narrow: bool = False,
    shared_unet: bool = False,
) -> IPFaceDiffPipeline:
    """SD-1.5's published architecture with random weights, built directly on the device
    (the UNets on ``unets`` when given: "meta" where only the VAE runs). ``narrow``: SD-1.5's
    shapes at narrow widths (``NARROW_*``). ``shared_unet``: ε1 and ε2 as LoRA adapters over one
    base UNet (:func:`add_role_adapters`), as a model set with an identity LoRA loads, instead of
    two UNets as with two fine-tuned models."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, vae_config, text_config = (
        (NARROW_UNET, NARROW_VAE, NARROW_TEXT) if narrow else (SD15_UNET, SD15_VAE, SD15_TEXT)
    )
    with torch.device(unets or device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config)
        identity_unet = unet if shared_unet else UNet2DConditionModel(**unet_config)
    with torch.device(device):
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    edit_weights = add_role_adapters(unet) if shared_unet else None
    for module in {id(m): m for m in (unet, identity_unet, vae, text_encoder)}.values():
        module.to(dtype=dtype).eval().requires_grad_(False)
    return IPFaceDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_bpe_tokenizer(),
        unet=unet,
        identity_unet=identity_unet,
        scheduler=DDIMScheduler(**SD1_SCHEDULER_CONFIG),
        edit_adapter_weights=edit_weights,
    )


def add_role_adapters(unet, rank: int = 16) -> dict[str, float]:
    """ε1 ("identity") and one ε2 adapter as random LoRAs of ``rank`` on the attention
    projections of ``unet`` (peft through diffusers' ``add_adapter``); their B matrices are not
    zero, so each role computes its own model. Returns the edit weights the pipeline switches to."""
    from peft import LoraConfig

    import warnings

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    generator = torch.Generator().manual_seed(1)
    for name in (IDENTITY_ADAPTER, "edit_0"):
        with warnings.catch_warnings():  # peft's note that a second adapter joins the first: meant here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
            unet.add_adapter(config, name)
    with torch.no_grad():
        for module_name, tensor in unet.named_parameters():
            if "lora_B" in module_name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return {"edit_0": 1.0}


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A shape-only copy of a diffusers model, built from its configuration (no weights, no memory)."""
    with torch.device("meta"):
        return type(module).from_config(module.config).requires_grad_(False)


def counted_gflops(run) -> float:
    """GFLOPs of the convolutions, matrix products and attention that ``run()`` executes."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def unet_gflops(pipe: IPFaceDiffPipeline, latent: int) -> float:
    """GFLOPs of one UNet evaluation (one frame, one prompt) at ``latent``² latents."""
    unet = meta_copy(pipe.unet)
    dim = pipe.text_encoder.config.hidden_size
    with torch.device("meta"):
        sample, text = torch.empty(1, unet.config.in_channels, latent, latent), torch.empty(1, 77, dim)
    return counted_gflops(lambda: unet(sample, torch.tensor(500), encoder_hidden_states=text))


def identity_call_gflops(pipe: IPFaceDiffPipeline, latent: int) -> float:
    """GFLOPs of one identity-guidance call's VAE decoder forward and its backward to the latent
    (one keyframe at ``latent``² latents; the identity net on top is left out: it is small)."""
    vae = meta_copy(pipe.vae)

    def run():
        with torch.enable_grad():
            point = torch.empty(1, vae.config.latent_channels, latent, latent, device="meta", requires_grad=True)
            vae.decode(point).sample.float().sum().backward()

    return counted_gflops(run)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors alive at once while open, counted per storage as operators
    create them and freed as their last tensor goes: under :class:`FakeTensorMode` a model's
    activation memory at any size, on a CPU, without computing anything. Inputs and weights made
    before it opened are not counted; the CUDA allocator's rounding and workspaces are not either."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # storage → [bytes, tensors alive on it]
        self.tensors: set[int] = set()  # ids of the tensors counted and alive
        self.live = self.peak = 0

    def release(self, key: int, tensor: int) -> None:
        self.tensors.discard(tensor)
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.tensors:  # in place: already counted
                self.tensors.add(id(tensor))
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.storages:
                    self.storages[key] = [storage.nbytes(), 0]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.storages[key][1] += 1
                weakref.finalize(tensor, self.release, key, id(tensor))
        return out


def sd15_accounting(
    *,
    frames: int = 40,
    steps: int = 50,
    window: int = DEFAULT_WINDOW,
    batch: int = 16,
    vae_batch: int = DEFAULT_VAE_BATCH,
    keyframe_batch: int = DEFAULT_KEYFRAME_BATCH,
    shared_unet: bool = False,
) -> dict:
    """What an edit at SD-1.5's size (fp16, 512², 4×64×64 latents) holds, in MB, computed on
    the CPU: the weights of each model (shape-only models), the activations of each model call
    at the batch its stage runs (:class:`LiveBytes` under fake tensors), and on the host the
    inversion of one window, its stored features and its frames. A stage's GPU estimate is the
    weights plus its largest call; the extended attention over a keyframe batch and the allocator's
    rounding come on top (a measured peak is the check)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextConfig, CLIPTextModel

    mb = 2**20
    half = torch.float16
    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(half)
        try:
            unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
            vae = AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)
            text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(default)

        def weights(module) -> float:
            return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / mb

        def peak(run) -> float:
            with LiveBytes() as live:
                run()
            return round(live.peak / mb, 1)

        def latents(n):
            return torch.empty(n, 4, 64, 64, dtype=half)

        def unet_call(n):
            return lambda: unet(
                latents(n), torch.tensor(500), encoder_hidden_states=torch.empty(n, 77, 768, dtype=half)
            )

        def guided_decode():  # as identity guidance runs it: checkpointed
            with torch.enable_grad(), decoder_checkpointing(vae):
                point = latents(1).requires_grad_(True)
                torch.autograd.grad(vae.decode(point).sample.float().sum(), point)

        unet_mb = weights(unet)
        keyframe_rows = 2 * (min(keyframe_batch, frames) + ANCHOR_KEYFRAMES)  # both halves of guidance
        with torch.no_grad():
            calls = {
                f"vae_encode_batch_{vae_batch}": peak(
                    lambda: vae.encode(torch.empty(vae_batch, 3, 512, 512, dtype=half))
                ),
                f"vae_decode_batch_{vae_batch}": peak(lambda: vae.decode(latents(vae_batch))),
                f"vae_decode_batch_{batch}": peak(lambda: vae.decode(latents(batch))),
                f"unet_batch_{batch}": peak(unet_call(batch)),
                f"unet_batch_{keyframe_rows}_keyframes": peak(unet_call(keyframe_rows)),
            }
        calls["vae_decode_backward_batch_1"] = peak(guided_decode)
        # the keyframes' edit carried to every other frame through their 64² tokens' similarities
        keyframes = list(range(0, frames, max(1, frames // 8)))
        deltas = {k: torch.empty(4, 64, 64) for k in keyframes}
        features = torch.empty(frames, 64 * 64, FEATURE_DIM, dtype=half)
        temperature = EditSettings(prompt="x").propagation_temperature
        squared_distances.cache_clear()  # a cached grid of another fake mode, or a real one, is not this mode's
        calls["propagation"] = peak(
            lambda: propagate_by_nearest_neighbour(deltas, features, frames, temperature=temperature)
        )
        squared_distances.cache_clear()
    lora_mb = 0.0
    if shared_unet:  # ε1's and ε2's adapters, counted on a shape-only copy (peft's layers refuse fake tensors)
        with torch.device("meta"):
            adapted = UNet2DConditionModel(**SD15_UNET).to(half)
        add_role_adapters(adapted)
        lora_mb = sum(t.numel() * t.element_size() for n, t in adapted.state_dict().items() if "lora" in n) / mb
    resident = {
        "unet_mb": round(unet_mb, 1),
        "unets": 1 if shared_unet else 2,
        "lora_adapters_mb": round(lora_mb, 1),
        "vae_mb": round(weights(vae), 1),
        "text_encoder_mb": round(weights(text), 1),
    }
    weights_mb = round(
        (unet_mb - lora_mb) * resident["unets"] + lora_mb + resident["vae_mb"] + resident["text_encoder_mb"], 1
    )
    resident["weights_mb"] = weights_mb
    stage_calls = {
        "encode": calls[f"vae_encode_batch_{vae_batch}"],
        "invert": calls[f"unet_batch_{batch}"],
        "mask": calls[f"unet_batch_{batch}"],
        "identity_features": calls[f"unet_batch_{batch}"],
        "keyframe_edit": calls[f"unet_batch_{keyframe_rows}_keyframes"],
        "identity_gradient": calls["vae_decode_backward_batch_1"],
        "propagation": calls["propagation"],
        "decode": calls[f"vae_decode_batch_{vae_batch}"],
    }
    held = min(frames, window) + (ANCHOR_KEYFRAMES if frames > window else 0)
    latent_bytes = 4 * 64 * 64 * 4  # float32 on the host
    feature_bytes = 64 * 64 * FEATURE_DIM * 2  # the last decoder block's tokens, projected, float16
    host = {
        "window_frames": held,
        "inversion_latents_mb": round(held * (steps + 1) * latent_bytes / mb, 1),
        "stored_features_mb": round(held * min(10, steps) * feature_bytes / mb, 1),
        "window_frames_mb": round(3 * min(frames, window) * 512 * 512 * 3 / mb, 1),  # crops, decoded, reconstruction
        "edited_latents_kept_mb": round(frames * latent_bytes / mb, 1),  # latents=True only: grows with the clip
    }
    return {
        "frames": frames,
        "steps": steps,
        "batch_size": batch,
        "vae_batch_size": vae_batch,
        "keyframe_batch": keyframe_batch,
        "shared_unet": shared_unet,
        "gpu_resident_mb": resident,
        "gpu_activation_peak_mb": calls,
        "gpu_estimate_mb_per_stage": {k: round(weights_mb + v, 1) for k, v in stage_calls.items()},
        "host_mb": host,
    }


class EvaluationCounter:
    """UNet evaluations while open: the frames each call of ε1 or ε2 takes (forward pre-hooks)."""

    def __init__(self, pipe: IPFaceDiffPipeline):
        self.unets = list({id(u): u for u in (pipe.unet, pipe.identity_unet)}.values())
        self.count = 0

    def __enter__(self):
        def hook(_module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.count += len(sample)

        self.handles = [u.register_forward_pre_hook(hook, with_kwargs=True) for u in self.unets]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def tiny_pipeline() -> IPFaceDiffPipeline:
    folder = build_tiny_models(Path(tempfile.mkdtemp()) / "tiny")
    return IPFaceDiffPipeline.from_model_set(load_model_set(str(folder)))


def clip_frames(count: int, size: int, seed: int = 0) -> np.ndarray:
    """A smooth texture drifting a pixel per frame: content that changes, as a real clip does."""
    import cv2

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (size + count + 8, size + count + 8, 3)).astype(np.uint8), (0, 0), 3)
    return np.stack([base[4 : 4 + size, i : i + size] for i in range(count)])


class PeakMemory:
    """Peak memory of a block, and of each pipeline stage in it (``stages``, the peak over the
    stage's repeats), told of the stages by :func:`observing_stages`.

    On a GPU the allocator's peak (weights included), the peak statistics reset as each stage
    begins; on the CPU the resident set's growth over the block, from the kernel's high-water mark
    (reset through /proc/self/clear_refs) where it can be reset, else sampled every 20 ms. A stage
    inside another counts in both: an outer stage's peak is folded up before the inner one resets it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.stages: dict[str, int] = {}
        self.open: list[list] = []  # [stage, its peak so far] of each open stage, innermost last
        self.whole = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = 0  # the allocator's peak includes the weights: what a card must hold
        else:
            import psutil

            self.process = psutil.Process()
            self.base = self.rss()
            self.kernel_peak = reset_rss_peak()
            self.sampled, self.running = self.base, True

            def sample():
                while self.running:
                    self.sampled = max(self.sampled, self.rss())
                    time.sleep(0.02)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        self.reset()
        self.observing = observing_stages(self.on_stage)
        self.observing.__enter__()
        return self

    def __exit__(self, *exc):
        self.observing.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.fold()
        if self.device.type != "cuda":
            self.running = False
            self.thread.join()
        self.peak = self.whole - self.base

    def rss(self) -> int:
        return self.process.memory_info().rss

    def read(self) -> int:
        """The peak since the last :meth:`reset`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return rss_peak() if self.kernel_peak else max(self.sampled, self.rss())

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kernel_peak:
            reset_rss_peak()
        else:
            self.sampled = self.rss()

    def fold(self) -> None:
        now = self.read()
        for entry in self.open:
            entry[1] = max(entry[1], now)
        self.whole = max(self.whole, now)

    def on_stage(self, stage: str, entering: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.fold()
        if entering:
            self.open.append([stage, 0])
        else:
            index = max(i for i, entry in enumerate(self.open) if entry[0] == stage)
            _, peak = self.open.pop(index)
            self.stages[stage] = max(self.stages.get(stage, 0), max(0, peak - self.base))
        self.reset()

    def stages_mb(self) -> dict[str, float]:
        return {stage: round(peak / 2**20, 1) for stage, peak in self.stages.items()}


def reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the present; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak() -> int:
    """The kernel's resident-set high-water mark (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def measure(
    pipe, frames, cache, device, *, batch_size: int, vae_batch_size: int, gflops: float, prompt: str = PROMPT, **kwargs
) -> dict:
    with PeakMemory(device) as memory, EvaluationCounter(pipe) as evaluations:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = pipe(
            frames,
            EditSettings(prompt=prompt, **kwargs),
            cache=cache,
            batch_size=batch_size,
            vae_batch_size=vae_batch_size,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    per_frame = evaluations.count / len(frames)
    return {
        "seconds": round(total, 3),
        # the process's CPU seconds: on a CPU shared with other work, steadier than the wall clock
        "cpu_seconds": round(cpu, 3),
        "stages": {k: round(result.timings[k], 3) for k in STAGES},
        "peak_memory_mb": round(memory.peak / 2**20, 1),
        "peak_memory_mb_per_stage": {k: memory.stages_mb().get(k, 0.0) for k in STAGES},
        "unet_calls": result.unet_calls,
        "unet_evaluations_per_frame": round(per_frame, 2),
        "unet_tflops_per_frame": float(f"{per_frame * gflops / 1e3:.4g}"),
        "inversion_reused": result.inversion_reused,
        # the edited frames' digest: runs that should agree (another VAE batch) can be compared
        "frames_digest": frames_digest(result.frames),
    }


def measure_identity_call(pipe, size: int, device) -> dict:
    """Seconds of one identity-guidance call (:meth:`guide_identity` on one keyframe), the
    identity net loaded before."""
    latent = size // 8
    generator = torch.Generator().manual_seed(0)
    x_t, eps = (torch.randn(1, 4, latent, latent, generator=generator) for _ in range(2))
    target = torch.nn.functional.normalize(torch.randn(1, 128, generator=generator), dim=-1)
    pipe.identity_net()
    if device.type == "cuda":  # kernels and the allocator; on the CPU one call is minutes
        pipe.guide_identity(x_t, eps, 0.5, target, 0.3)
    started, cpu_started = time.perf_counter(), time.process_time()
    pipe.guide_identity(x_t, eps, 0.5, target, 0.3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
        "gflops": round(identity_call_gflops(pipe, latent), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--full-size", action="store_true", help="SD-1.5 architecture at 512² (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--plan",
        default="full:40,reedit:40,full:160,every_frame:40,identity_gradient:40,full:16,reedit:16",
        help="runs in order, METHOD:FRAMES; METHOD is full, reedit (from full's cache), every_frame, "
        "identity_gradient (full with --identity-gradient, from full's cache) or identity_call (one "
        "identity-guidance call on one keyframe: its seconds and FLOPs; FRAMES is ignored); a suffix "
        "_unguided (full_unguided, reedit_unguided) turns identity guidance off",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNets (channels-last), as ModelSpec(compile=True)"
    )
    parser.add_argument(
        "--identity-gradient",
        type=float,
        default=1.0,
        help="the identity_gradient runs' scale (dlib's net: these models have no card)",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--attention-merge", type=float, default=0.0, help="the edits' --attention-merge (token merging; default off)"
    )
    parser.add_argument(
        "--vae-batch-size",
        type=int,
        default=DEFAULT_VAE_BATCH,
        help=f"frames per VAE call (default {DEFAULT_VAE_BATCH}; the UNet's batch size gives the old behaviour)",
    )
    parser.add_argument(
        "--shared-unet",
        action="store_true",
        help="with --full-size: ε1 and ε2 as LoRA adapters over one UNet (default: two UNets, as two fine-tunes)",
    )
    parser.add_argument(
        "--accounting-only",
        action="store_true",
        help="only the accounting of SD-1.5's memory at --vae-batch-size, --batch-size (default 16), --steps and "
        "--shared-unet, for 40 frames: no model runs",
    )
    parser.add_argument(
        "--no-accounting",
        action="store_true",
        help="skip the accounting of SD-1.5's memory (weights, activations per call, host; about half a minute)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="frames per UNet batch (default 16 on CUDA, 8 on CPU)"
    )
    args = parser.parse_args()
    if args.accounting_only:
        account = sd15_accounting(
            steps=args.steps, batch=args.batch_size or 16, vae_batch=args.vae_batch_size, shared_unet=args.shared_unet
        )
        print_accounting(account)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"sd15_accounting": account}, indent=2))
        return

    device = torch.device(args.device)
    dtype = torch.float16 if args.full_size and device.type == "cuda" else torch.float32
    plan = [(method, int(n)) for method, n in (item.split(":") for item in args.plan.split(","))]
    edits = [n for method, n in plan if method != "identity_call"]
    if args.full_size:  # only the VAE runs for identity_call alone: the UNets need no memory then
        unets = None if edits else torch.device("meta")
        pipe = full_size_pipeline(device, dtype, unets=unets, shared_unet=args.shared_unet)
    else:
        pipe = tiny_pipeline().to(device)
    if args.compile:
        compile_unets([pipe.unet, pipe.identity_unet])
    size = 512 if args.full_size else 64
    batch = args.batch_size or (16 if device.type == "cuda" else 8)
    common = dict(
        steps=args.steps, batch_size=batch, vae_batch_size=args.vae_batch_size, attention_merge=args.attention_merge
    )
    scratch = Path(tempfile.mkdtemp(prefix="edit-speed-"))
    gflops = unet_gflops(pipe, size // 8)

    rows: dict[str, dict] = {}
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "full_size": args.full_size,
        "resolution": size,
        "steps": args.steps,
        "batch_size": batch,
        "vae_batch_size": args.vae_batch_size,
        "shared_unet": args.shared_unet,
        "compiled": args.compile,
        "attention_merge": args.attention_merge,
        "reedit_prompt": REEDIT_PROMPT,
        "unet_gflops_per_evaluation": float(f"{gflops:.4g}"),
        "runs": rows,
    }
    if edits:
        # Warm-up, not measured: kernels, the allocator, the compiled graphs and every batch shape
        # the runs below use (a keyframe batch of every size the step loop draws).
        started = time.perf_counter()
        warm = clip_frames(min(16, max(edits)), size, seed=99)
        pipe(warm, EditSettings(prompt="warm up", steps=2), batch_size=batch, vae_batch_size=args.vae_batch_size)
        pipe(
            warm,
            EditSettings(prompt="warm up", steps=2, every_frame=True),
            batch_size=batch,
            vae_batch_size=args.vae_batch_size,
        )
        results["warm_up_seconds"] = round(time.perf_counter() - started, 1)

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    for method, n in plan:
        if method == "identity_call":
            rows[method] = measure_identity_call(pipe, size, device)
            print(f"{method}: {rows[method]['seconds']:.2f} s, {rows[method]['gflops']:.0f} GFLOPs", flush=True)
            save()
            continue
        frames = clip_frames(n, size, seed=n)
        base = method.removesuffix("_unguided")  # identity guidance off: what the prompt's work costs without it
        unguided = "-unguided" if base != method else ""
        folder = scratch / (("every" if base == "every_frame" else "full") + unguided) / str(n)
        guided = {"identity_gradient": args.identity_gradient} if base == "identity_gradient" else {}
        guided = {"identity_gradient": 0.0} if base != method else guided
        if base == "reedit":  # what a user re-edits: the same clip, another prompt
            guided["prompt"] = REEDIT_PROMPT
        rows[f"{method}/{n}"] = measure(
            pipe,
            frames,
            InversionCache(folder),
            device,
            every_frame=base == "every_frame",
            gflops=gflops,
            **guided,
            **common,
        )
        print(f"{method}/{n}: {rows[f'{method}/{n}']['seconds']:.2f} s", flush=True)
        save()

    def ratio(a, b, key="seconds"):
        return round(rows[a][key] / rows[b][key], 3) if a in rows and b in rows and rows[b][key] else None

    ref = 40 if "full/40" in rows else (edits or [0])[0]
    results["ratios"] = {
        "every_frame_over_full": ratio(f"every_frame/{ref}", f"full/{ref}"),
        "reedit_over_full": ratio(f"reedit/{ref}", f"full/{ref}"),
        "reedit_over_full_unguided": ratio(f"reedit_unguided/{ref}", f"full_unguided/{ref}"),
        "reedit_over_full_cpu_seconds": ratio(f"reedit/{ref}", f"full/{ref}", "cpu_seconds"),
        "reedit_over_full_unguided_cpu_seconds": ratio(f"reedit_unguided/{ref}", f"full_unguided/{ref}", "cpu_seconds"),
        "reedit_over_full_evaluations": ratio(f"reedit/{ref}", f"full/{ref}", "unet_evaluations_per_frame"),
        "identity_gradient_over_reedit": ratio(f"identity_gradient/{ref}", f"reedit/{ref}"),
        "time_160_over_40": ratio("full/160", "full/40"),
        "memory_160_over_40": ratio("full/160", "full/40", "peak_memory_mb"),
    }
    save()
    if not args.no_accounting:
        results["sd15_accounting"] = sd15_accounting(
            frames=ref or 40,
            steps=args.steps,
            batch=batch,
            vae_batch=args.vae_batch_size,
            shared_unet=args.shared_unet,
        )
        save()

    header = (
        f"{'run':<20}{'total s':>9}{'CPU s':>8}"
        + "".join(f"{s:>19}" for s in STAGES)
        + f"{'peak MB':>10}{'UNet evals/frame':>18}{'TFLOPs/frame':>14}"
    )
    compiled = ", compiled" if args.compile else ""
    print(
        f"device: {results['device']}, {size}², {args.steps} steps, batch {batch}{compiled}, {gflops:.2f} GFLOPs per UNet evaluation"
    )
    print(header)
    for name, row in rows.items():
        if "stages" not in row:
            print(f"{name:<20}{row['seconds']:>9.2f}  ({row['gflops']:.0f} GFLOPs)")
            continue
        print(
            f"{name:<20}{row['seconds']:>9.2f}{row['cpu_seconds']:>8.2f}"
            + "".join(f"{row['stages'][s]:>19.2f}" for s in STAGES)
            + f"{row['peak_memory_mb']:>10.0f}{row['unet_evaluations_per_frame']:>18.1f}{row['unet_tflops_per_frame']:>14.4f}"
        )
    unit = (
        "peak MB per stage (allocated, weights included)" if device.type == "cuda" else "peak MB per stage (RSS growth)"
    )
    print(unit)
    print(f"{'run':<20}" + "".join(f"{s:>19}" for s in STAGES))
    for name, row in rows.items():
        if "peak_memory_mb_per_stage" in row:
            print(f"{name:<20}" + "".join(f"{row['peak_memory_mb_per_stage'][s]:>19.1f}" for s in STAGES))
    print("ratios:", json.dumps(results["ratios"]))
    if "sd15_accounting" in results:
        print_accounting(results["sd15_accounting"])


def print_accounting(account: dict) -> None:
    resident, host = account["gpu_resident_mb"], account["host_mb"]
    unets = "one UNet with ε1/ε2 LoRAs" if account["shared_unet"] else "two UNets"
    print(
        f"SD-1.5 accounting (fp16, 512², {account['frames']} frames, batch {account['batch_size']}, "
        f"VAE batch {account['vae_batch_size']}, {unets}): weights {resident['weights_mb']:.0f} MB "
        f"(UNet {resident['unet_mb']:.0f} ×{resident['unets']}, LoRAs {resident['lora_adapters_mb']:.0f}, "
        f"VAE {resident['vae_mb']:.0f}, text encoder {resident['text_encoder_mb']:.0f})"
    )
    print("  activation peak per call, MB:", json.dumps(account["gpu_activation_peak_mb"]))
    print("  GPU estimate per stage, MB:", json.dumps(account["gpu_estimate_mb_per_stage"]))
    print("  host, MB:", json.dumps(host))


if __name__ == "__main__":
    main()
