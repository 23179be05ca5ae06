"""The keyframes' extended self-attention at SD-1.5's size: FLOPs and seconds with and without
token merging (--attention-merge), and the largest intermediate with and without query chunks
where SDPA builds the whole score matrix (its math kernel).

    python benchmarks/extended_attention.py --json OUT.json [--keyframes 5] [--seconds-side 256]

FLOPs are counted by torch's FlopCounterMode on shape-only (meta) tensors of the real shapes:
SD-1.5's self-attention layers at 512² (64², 32², 16² and 8² tokens), one keyframe pass (two CFG
halves of ``--keyframes`` frames; 40 frames at one keyframe per 8 give 5), merging where the
pipeline merges (the highest-resolution layers). Seconds: one call of the highest-resolution layer
on this machine's CPU at ``--seconds-side`` pixels (512² takes minutes per call on one core).
Memory: the peak resident growth of one such call with SDPA held to its math kernel, measured in a
fresh process each, unchunked and chunked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfacediff.editing.hooks import ATTENTION_CHUNK_SCORES, extended_attention  # noqa: E402

# SD-1.5 at 512²: (tokens per frame, channels, self-attention layers, merged) per resolution level
SD15_LEVELS = [(64 * 64, 320, 5, True), (32 * 32, 640, 5, False), (16 * 16, 1280, 5, False), (8 * 8, 1280, 1, False)]
HEADS = 8


def layer_inputs(tokens: int, channels: int, keyframes: int, device: str = "cpu") -> list[torch.Tensor]:
    generator = None if device == "meta" else torch.Generator().manual_seed(0)
    shape = (2 * keyframes, tokens, channels)  # the two CFG halves of the keyframe batch
    if device == "meta":
        return [torch.empty(shape, device="meta") for _ in range(3)]
    return [torch.randn(shape, generator=generator) for _ in range(3)]


def attention_flops(keyframes: int, merge: float) -> int:
    total = 0
    for tokens, channels, layers, merged in SD15_LEVELS:
        counter = FlopCounterMode(display=False)
        with counter:
            extended_attention(
                *layer_inputs(tokens, channels, keyframes, "meta"),
                HEADS,
                keyframes,
                merge=merge if merged else 0.0,
                chunk_scores=2**62,
            )
        total += layers * counter.get_total_flops()
    return total


def layer_seconds(side: int, keyframes: int, merge: float, repeats: int = 3) -> float:
    inputs = layer_inputs((side // 8) ** 2, 320, keyframes)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        extended_attention(*inputs, HEADS, keyframes, merge=merge)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def peak_growth_mib(side: int, keyframes: int, chunk_scores: int) -> float:
    """One math-kernel call in a fresh process: its peak resident memory beyond its inputs'."""
    code = (
        "import resource, sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from torch.nn.attention import SDPBackend, sdpa_kernel\n"
        "from benchmarks.extended_attention import layer_inputs, HEADS\n"
        "from ipfacediff.editing.hooks import extended_attention\n"
        f"inputs = layer_inputs({(side // 8) ** 2}, 320, {keyframes})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with sdpa_kernel(SDPBackend.MATH):\n"
        f"    extended_attention(*inputs, HEADS, {keyframes}, chunk_scores={chunk_scores})\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keyframes", type=int, default=5)
    parser.add_argument("--merge", type=float, default=0.5)
    parser.add_argument("--seconds-side", type=int, default=256)
    parser.add_argument("--memory-side", type=int, default=256, help="the math kernel's whole scores must fit here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flops = {share: attention_flops(args.keyframes, share) for share in (0.0, args.merge)}
    seconds = {share: layer_seconds(args.seconds_side, args.keyframes, share) for share in (0.0, args.merge)}
    whole_scores = 2 * HEADS * (args.keyframes * 64 * 64) ** 2  # 512², highest resolution, both CFG halves
    memory = {
        "unchunked": peak_growth_mib(args.memory_side, args.keyframes, 2**62),
        "chunked": peak_growth_mib(args.memory_side, args.keyframes, ATTENTION_CHUNK_SCORES),
    }
    results = {
        "keyframes": args.keyframes,
        "attention_gflops_per_keyframe_pass_512": {str(k): round(v / 1e9, 1) for k, v in flops.items()},
        "flops_saved": round(1 - flops[args.merge] / flops[0.0], 4),
        f"highest_resolution_layer_seconds_cpu_{args.seconds_side}": {str(k): round(v, 4) for k, v in seconds.items()},
        "seconds_saved": round(1 - seconds[args.merge] / seconds[0.0], 4),
        "math_kernel_scores_gib_512_float32": {
            "unchunked": round(whole_scores * 4 / 2**30, 2),
            "chunked": round(ATTENTION_CHUNK_SCORES * 4 / 2**30, 2),
        },
        f"math_kernel_peak_growth_mib_cpu_{args.memory_side}": {k: round(v, 1) for k, v in memory.items()},
    }
    for key, value in results.items():
        print(f"{key:<48}{value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
