"""Seconds per stage, UNet evaluations, FLOPs and peak memory of an edit: the full method,
--every-frame, a re-edit, and identity guidance while sampling.

    python benchmarks/edit_speed.py --json OUT.json                       # tiny models, CPU
    python benchmarks/edit_speed.py --full-size --device cuda --json OUT.json   # SD-1.5 architecture, fp16, 512²
    python benchmarks/edit_speed.py --full-size --device cuda --compile --plan full:40,reedit:40,full:160
    python benchmarks/edit_speed.py --full-size --device cpu --plan identity_call:1   # one identity-guidance call

--full-size builds the real SD-1.5 configurations with random weights (no download: timing does
not depend on the weights); ε1 and ε2 are two separate UNets, as with two fine-tuned models.
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
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfacediff.diffusion import InversionCache  # noqa: E402
from ipfacediff.editing import STAGES, IPFaceDiffPipeline  # noqa: E402
from ipfacediff.models import (  # noqa: E402
    SD1_SCHEDULER_CONFIG,
    build_tiny_models,
    clip_bpe_tokenizer,
    compile_unets,
    load_model_set,
)
from ipfacediff.settings import EditSettings  # noqa: E402


def full_size_pipeline(
    device: torch.device, dtype: torch.dtype, *, unets: torch.device | None = None
) -> IPFaceDiffPipeline:
    """SD-1.5's published architecture with random weights, built directly on the device
    (the UNets on ``unets`` when given: "meta" where only the VAE runs)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = dict(
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
    with torch.device(unets or device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config)
        identity_unet = UNet2DConditionModel(**unet_config)
    with torch.device(device):
        vae = AutoencoderKL(
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
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
            )
        )
    for module in (unet, identity_unet, vae, text_encoder):
        module.to(dtype=dtype).eval().requires_grad_(False)
    return IPFaceDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_bpe_tokenizer(),
        unet=unet,
        identity_unet=identity_unet,
        scheduler=DDIMScheduler(**SD1_SCHEDULER_CONFIG),
    )


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
    """Peak memory of a block: CUDA allocator peak on a GPU, sampled RSS growth on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            process = psutil.Process()
            self.base = process.memory_info().rss
            self.running = True

            def sample():
                while self.running:
                    self.peak = max(self.peak, process.memory_info().rss - self.base)
                    time.sleep(0.02)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()


def measure(pipe, frames, cache, device, *, batch_size: int, gflops: float, **kwargs) -> dict:
    with PeakMemory(device) as memory, EvaluationCounter(pipe) as evaluations:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = pipe(
            frames, EditSettings(prompt="a face with eyeglasses", **kwargs), cache=cache, batch_size=batch_size
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
        "unet_calls": result.unet_calls,
        "unet_evaluations_per_frame": round(per_frame, 2),
        "unet_tflops_per_frame": float(f"{per_frame * gflops / 1e3:.4g}"),
        "inversion_reused": result.inversion_reused,
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
        "--batch-size", type=int, default=None, help="frames per UNet batch (default 16 on CUDA, 8 on CPU)"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if args.full_size and device.type == "cuda" else torch.float32
    plan = [(method, int(n)) for method, n in (item.split(":") for item in args.plan.split(","))]
    edits = [n for method, n in plan if method != "identity_call"]
    if args.full_size:  # only the VAE runs for identity_call alone: the UNets need no memory then
        pipe = full_size_pipeline(device, dtype, unets=None if edits else torch.device("meta"))
    else:
        pipe = tiny_pipeline().to(device)
    if args.compile:
        compile_unets([pipe.unet, pipe.identity_unet])
    size = 512 if args.full_size else 64
    batch = args.batch_size or (16 if device.type == "cuda" else 8)
    common = dict(steps=args.steps, batch_size=batch)
    scratch = Path(tempfile.mkdtemp(prefix="edit-speed-"))
    gflops = unet_gflops(pipe, size // 8)

    rows: dict[str, dict] = {}
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "full_size": args.full_size,
        "resolution": size,
        "steps": args.steps,
        "batch_size": batch,
        "compiled": args.compile,
        "unet_gflops_per_evaluation": float(f"{gflops:.4g}"),
        "runs": rows,
    }
    if edits:
        # Warm-up, not measured: kernels, the allocator, the compiled graphs and every batch shape
        # the runs below use (a keyframe batch of every size the step loop draws).
        started = time.perf_counter()
        warm = clip_frames(min(16, max(edits)), size, seed=99)
        pipe(warm, EditSettings(prompt="warm up", steps=2), batch_size=batch)
        pipe(warm, EditSettings(prompt="warm up", steps=2, every_frame=True), batch_size=batch)
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
    print("ratios:", json.dumps(results["ratios"]))


if __name__ == "__main__":
    main()
