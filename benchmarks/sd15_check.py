"""One edit at SD-1.5 size, checked where only that size shows it: every stage's tensors finite,
seconds per stage, peak memory, and how well the stored correspondence features keep the nearest
neighbours of the full 320-channel decoder features (#32 §4, §5, §7).

    python benchmarks/sd15_check.py --device cuda --json OUT.json     # SD-1.5 architecture, fp16, 512², 40 frames
    python benchmarks/sd15_check.py --small --json OUT.json           # the tiny models on the CPU: the script's own check

Random weights (no download): finiteness in float16 and the features' shape do not need trained
weights, though trained weights can overflow where random ones do not. Identity guidance is on
(the edit command's default scale). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_speed import PeakMemory, clip_frames, full_size_pipeline, tiny_pipeline  # noqa: E402

from ipfacediff.diffusion import InversionCache, capture_output, encode_prompt  # noqa: E402
from ipfacediff.editing import STAGES  # noqa: E402
from ipfacediff.editing.propagation import nearest_neighbour_field  # noqa: E402
from ipfacediff.settings import EditSettings  # noqa: E402


class FiniteWatch:
    """Counts, per model, the forward passes whose output holds NaN or inf (forward hooks)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.calls: Counter[str] = Counter()
        self.non_finite: Counter[str] = Counter()

    def __enter__(self) -> FiniteWatch:
        def hook(name):
            def check(_module, _inputs, output):
                tensor = getattr(output, "sample", None)
                tensor = output[0] if tensor is None and isinstance(output, tuple) else tensor
                tensor = output if tensor is None else tensor
                self.calls[name] += 1
                if isinstance(tensor, torch.Tensor) and not bool(tensor.isfinite().all()):
                    self.non_finite[name] += 1

            return check

        self.handles = [m.register_forward_hook(hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def correspondence_agreement(pipe, frames, steps: int, batch_size: int) -> dict[str, float]:
    """Per stored step: the share of tokens of frames 1.. whose nearest neighbour in frame 0 is the
    one the full decoder features give (what the projection to the stored dimensions keeps)."""
    inverted, _ = pipe.invert(frames, steps=steps, batch_size=batch_size)
    unet = pipe.identity_unet
    empty = encode_prompt(pipe.tokenizer, pipe.text_encoder, [""]).to(unet.device, unet.dtype)
    shares = {}
    rows = list(range(min(len(frames), 8)))
    for step, stored in sorted(inverted.features.items()):
        source = inverted.latents[step + 1] if step + 1 < len(inverted.latents) else inverted.clean
        with capture_output(unet.up_blocks[-1]) as captured:
            batch = source[rows].to(unet.device, unet.dtype)
            unet(batch, inverted.timesteps[step], encoder_hidden_states=empty.expand(len(batch), -1, -1))
        full = captured[0].flatten(2).transpose(1, 2).float()
        side = int(full.shape[1] ** 0.5)

        def field(x: torch.Tensor) -> torch.Tensor:
            x = x.to(full.device).float()
            return nearest_neighbour_field(x[rows[1:]], x[[0] * (len(rows) - 1)], side=side)

        shares[str(step)] = round((field(stored[rows]) == field(full)).float().mean().item(), 4)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="the tiny models at 64² instead of SD-1.5 at 512²")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", choices=["float16", "float32"], default=None, help="default: float16 on CUDA")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    pipe = tiny_pipeline().to(device) if args.small else full_size_pipeline(device, dtype)
    size = 64 if args.small else 512
    batch = 16 if device.type == "cuda" else 8
    frames = clip_frames(args.frames, size)
    settings = EditSettings(prompt="a face with eyeglasses", steps=args.steps)
    watched = {
        "unet (ε2)": pipe.unet,
        "identity_unet (ε1)": pipe.identity_unet,
        "vae encoder": pipe.vae.encoder,
        "vae decoder": pipe.vae.decoder,
        "text encoder": pipe.text_encoder,
    }
    cache = InversionCache(Path(tempfile.mkdtemp(prefix="sd15-check-")))
    started = time.perf_counter()
    with FiniteWatch(watched) as watch, PeakMemory(device) as memory:
        result = pipe(frames, settings, cache=cache, batch_size=batch)
    seconds = time.perf_counter() - started
    agreement = correspondence_agreement(pipe, frames, args.steps, batch)
    stored = next(iter(pipe.invert(frames[:1], steps=args.steps, cache=cache)[0].features.values()))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": size,
        "frames": args.frames,
        "steps": args.steps,
        "seconds": round(seconds, 2),
        "stages": {k: round(result.timings.get(k, 0.0), 3) for k in STAGES},
        "peak_memory_mb": round(memory.peak / 2**20, 1),
        "forward_passes": dict(watch.calls),
        "non_finite_forward_passes": {name: watch.non_finite[name] for name in watched},
        "identity_steps_skipped": result.identity_steps_skipped,
        "latents_finite": bool(result.latents.isfinite().all()),
        "stored_feature_shape_per_frame": list(stored.shape[1:]),
        "decoder_channels": pipe.identity_unet.config.block_out_channels[0],
        "correspondence_agreement": agreement,
    }
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    bad = sum(report["non_finite_forward_passes"].values()) + (not report["latents_finite"])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
