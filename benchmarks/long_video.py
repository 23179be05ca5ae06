"""Long videos in bounded memory: peak memory, seconds and cache bytes of an edit against clip length,
the inversion's bytes per frame at SD-1.5's latent and feature sizes, and the window borders on FaceWorld.

    python benchmarks/long_video.py --frames 100,1000 --json OUT.json                 # tiny models, CPU
    python benchmarks/long_video.py --frames 100,1000 --full-size --device cuda --json OUT.json

By default tiny random models on the CPU, 4 DDIM steps and 32² crops, so that 1000 frames finish
in minutes on two cores; --full-size is SD-1.5's architecture with random weights, fp16, 512²
(``full_size_pipeline`` of edit_speed.py). The window is 64 frames, so that every length is edited
in windows and the ratios show growth with the clip's length at one window size (not the step
from one window to several, which a window of the shortest clip's length would add); the crops
and the edited frames are kept in memory-mapped files, as ``ipfacediff edit`` keeps a long
track's. Each clip length runs in its own
process, so that one run's freed memory does not hide the next one's growth; peak memory is the
growth of the resident set over the edit (peak GPU memory on a GPU), and of its anonymous part
(without the mapped files' pages, which the kernel can drop); seconds and peaks are the medians of
--repeat runs, stages and UNet calls those of the first. The JSON has a top-level "ratios" object
(rss_1000_over_100, time_1000_over_100: the last --frames over the first), "runs", "sizes" (the
inversion's bytes per frame, measured with the tiny models at the crop size where their latents
are SD-1.5's 4×64×64 and the cached features 64×64 tokens, and SD-1.5's 64 projected feature
channels), "estimate" (host memory of a 10,000-frame edit at SD-1.5's size from those) and
"borders" (a FaceWorld clip edited in windows: warp error at the window borders against inside,
and the attribute oracle's calls on both sides of each border; --no-borders skips it, and by
default it measures the eyeglasses edit only: about 3 of the default run's 6 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_speed import PeakMemory, clip_frames, full_size_pipeline, tiny_pipeline  # noqa: E402
from ipfacediff.diffusion import CACHE_CHUNK, FEATURE_DIM, InversionCache, chunk_bounds, observing_stages  # noqa: E402
from ipfacediff.editing import ANCHOR_KEYFRAMES, edit_windows  # noqa: E402
from ipfacediff.settings import DEFAULT_STEPS, DEFAULT_WINDOW, EditSettings  # noqa: E402

PROMPT = "a face with eyeglasses"
GB = 2**30


class HostPeak:
    """Peak growth of the resident set and of its anonymous part over a block (sampled)."""

    def __enter__(self):
        import threading

        self.base, self.peak, self.running = self.read(), {"rss": 0, "anon": 0}, True

        def sample():
            while self.running:
                now = self.read()
                for key in self.peak:
                    self.peak[key] = max(self.peak[key], now[key] - self.base[key])
                time.sleep(0.02)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @staticmethod
    def read() -> dict:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "anon": int(fields["RssAnon"].split()[0]) * 1024}


def live_anon_bytes() -> int:
    """The anonymous resident set once Python's garbage and the heap's free pages are returned: what
    is alive, not what the allocator happened to keep from the window before."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the floor keeps the heap's free pages
        pass
    return HostPeak.read()["anon"]


class WindowFloors:
    """The anonymous resident set as each window after the first begins (the window before's
    tensors gone), against the frames finished by then: what an edit holds for the clip so far,
    without the transient peaks of one window's work. Told of the stages by :func:`observing_stages`."""

    def __init__(self, starts: list[int]):
        self.starts, self.points, self.decoded = starts, [], False

    def __call__(self, stage: str, entering: bool) -> None:
        if stage == "decode" and not entering:
            self.decoded = True
        elif stage == "invert" and entering and self.decoded:  # a new window's first stage
            self.decoded = False
            done = self.starts[len(self.points) + 1]
            self.points.append((done, live_anon_bytes()))

    def growth_mb_per_1000_frames(self) -> float | None:
        """The least-squares slope of the floors (None: fewer than three windows after the first)."""
        if len(self.points) < 3:
            return None
        done, anon = np.array(self.points, dtype=np.float64).T
        return round(float(np.polyfit(done, anon, 1)[0]) * 1000 / 2**20, 3)


def one_run(frames: int, args: argparse.Namespace) -> dict:
    """Edit a drifting texture of ``frames`` frames from an empty cache, in this process."""
    device = torch.device(args.device)
    if args.full_size or args.sd15_shapes:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = full_size_pipeline(device, dtype, narrow=args.sd15_shapes)
    else:
        pipe = tiny_pipeline().to(device)
    size = 512 if args.full_size or args.sd15_shapes else args.size
    batch = 16 if device.type == "cuda" else 8
    scratch = Path(tempfile.mkdtemp(prefix="long-video-"))
    warm = 4 if args.sd15_shapes else 16  # not measured: kernels and the allocator
    pipe(clip_frames(warm, size, seed=99), EditSettings(prompt="warm up", steps=2), batch_size=batch)
    clip = np.lib.format.open_memmap(scratch / "crops.npy", mode="w+", dtype=np.uint8, shape=(frames, size, size, 3))
    clip[:] = clip_frames(frames, size, seed=frames)  # before the measurement, then dropped
    clip.flush()
    clip = np.load(scratch / "crops.npy", mmap_mode="r")
    edited = np.lib.format.open_memmap(scratch / "edited.npy", mode="w+", dtype=np.uint8, shape=clip.shape)
    cache = InversionCache(scratch / "cache")
    settings = EditSettings(
        prompt=PROMPT, steps=args.steps, window=args.window, identity_gradient=args.identity_gradient
    )
    floors = WindowFloors([begin for begin, _ in edit_windows(chunk_bounds(list(range(frames))), args.window)])
    with PeakMemory(device) as memory, HostPeak() as host, observing_stages(floors):
        started = time.perf_counter()
        result = pipe(clip, settings, cache=cache, batch_size=batch, output=edited, latents=args.keep_latents)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    run = {
        "frames": frames,
        "seconds": round(seconds, 3),
        "peak_memory_mb": round(memory.peak / 2**20, 1),
        "cache_bytes": cache.size_bytes(),
        "windows": result.windows,
        "unet_calls": result.unet_calls,
        "stages": {k: round(v, 3) for k, v in result.timings.items()},
    }
    run["peak_anon_mb"] = round(host.peak["anon"] / 2**20, 1)  # host memory, also on a GPU
    run["peak_memory_mb_per_stage"] = memory.stages_mb()
    run["window_floors_mb"] = [(done, round(anon / 2**20, 2)) for done, anon in floors.points]
    run["floor_growth_mb_per_1000_frames"] = floors.growth_mb_per_1000_frames()
    run["stores"] = clip_stores(result)
    return run


def clip_stores(result) -> dict:
    """Bytes of what an edit's result holds for every frame of the clip, measured on the result:
    the edited latents (and what they would be at SD-1.5's 4×64×64), the keyframes of every step.
    The crops and the edited frames are memory-mapped files here, as ``ipfacediff edit`` keeps them."""
    latents = result.latents
    keyframes = sum(sys.getsizeof(step) + 28 * len(step) for step in result.keyframes_per_step)
    if latents is None:  # not kept (latents=False, as ``ipfacediff edit`` asks)
        return {
            "latents_bytes": 0,
            "latents_shape": None,
            "latents_bytes_at_sd15": 0,
            "keyframes_per_step_bytes": keyframes,
        }
    per_frame = latents[0].numel() * latents.element_size()
    return {
        "latents_bytes": latents.numel() * latents.element_size(),
        "latents_shape": list(latents.shape[1:]),
        "latents_bytes_at_sd15": len(latents) * per_frame * (64 * 64) // (latents.shape[-1] * latents.shape[-2]),
        "keyframes_per_step_bytes": keyframes,
    }


def inversion_sizes(steps: int = 2, frames: int = 2) -> dict:
    """Bytes per frame of an inversion at SD-1.5's latent size, 4×64×64 (the tiny models at the
    crop size that gives it: their VAE shrinks 4×, SD-1.5's 8×): held in memory (latents of every
    step, features of the captured steps) and cached on disk."""
    pipe = tiny_pipeline()
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scratch = Path(tempfile.mkdtemp(prefix="long-video-sizes-"))
    cache = InversionCache(scratch / "cache")
    inverted, _ = pipe.invert(clip_frames(frames, 64 * factor, seed=1), steps=steps, cache=cache)
    latent = inverted.latents[0][0].numel() * inverted.latents[0].element_size()
    captured = next(iter(inverted.features.values()))
    tokens, channels = captured.shape[1:]
    feature = tokens * FEATURE_DIM * captured.element_size()  # SD-1.5's 320 channels are projected to 64
    return {
        "measured_at": {"resolution": 64 * factor, "steps": steps, "frames": frames},
        "latent_shape": list(inverted.latents[0].shape[1:]),
        "feature_tokens": tokens,
        "feature_channels_tiny": channels,
        "feature_channels_sd15": FEATURE_DIM,
        "latent_bytes_per_frame_step": latent,
        "feature_bytes_per_frame_captured_step": feature,
        "captured_steps": len(inverted.features),
        "cache_bytes_per_frame_step_tiny": round(cache.size_bytes() / frames / steps),
        "crop_bytes_per_frame": 512 * 512 * 3,
    }


def estimate(sizes: dict, frames: int = 10_000, steps: int = DEFAULT_STEPS, window: int = DEFAULT_WINDOW) -> dict:
    """Host memory of an edit of ``frames`` frames at SD-1.5's size (512² crops, 50 steps), from
    the measured sizes: what one window holds (its inversion with the anchors' rows, its crops
    decoded and reconstructed), what grows with the clip (the edited latents the result keeps), and
    the crops that ``ipfacediff edit`` keeps in memory-mapped files for a track longer than a window
    (page cache, which the kernel can drop; a Python caller that passes no ``output`` array holds
    the edited crops in memory instead). The models sit on the GPU; the process's own baseline
    (Python, torch, the CUDA context) is an assumption, not measured here."""
    latent, crop = sizes["latent_bytes_per_frame_step"], sizes["crop_bytes_per_frame"]
    per_frame_inversion = steps * latent + min(10, steps) * sizes["feature_bytes_per_frame_captured_step"]
    window_bytes = (window + ANCHOR_KEYFRAMES) * per_frame_inversion + 2 * window * crop
    clip_bytes = frames * latent
    baseline = 2 * GB
    total = window_bytes + clip_bytes + baseline
    return {
        "frames": frames,
        "steps": steps,
        "window": window,
        "inversion_bytes_per_frame": per_frame_inversion,
        "window_gb": round(window_bytes / GB, 2),
        "grows_with_clip_gb": round(clip_bytes / GB, 2),
        "assumed_process_baseline_gb": baseline / GB,
        "host_total_gb": round(total / GB, 2),
        "fits_16_gb": total < 16 * GB,
        "mapped_crop_files_gb": round(2 * frames * crop / GB, 2),
        "host_total_if_edited_crops_in_memory_gb": round((total + frames * crop) / GB, 2),
        "cache_gb": round(frames * (per_frame_inversion + latent + crop) / GB, 1),
        "before_this_change_gb": round((frames * (per_frame_inversion + 2 * crop) + baseline) / GB, 1),
    }


def growth(runs: dict, lengths: list[int]) -> dict:
    """Peak memory growth in MB per 1,000 frames, from the first clip length to the last: what an
    edit holds for the whole clip rather than for one window (medians of the repeats, and each
    repeat's own, paired by order, to show how stable it is)."""
    first, last = runs[str(lengths[0])], runs[str(lengths[-1])]
    scale = 1000 / (lengths[-1] - lengths[0])
    out = {
        f"{name}_mb_per_1000_frames": round((last["stores"][name] - first["stores"][name]) * scale / 2**20, 3)
        for name in ("latents_bytes", "latents_bytes_at_sd15", "keyframes_per_step_bytes")
        if "stores" in first
    }
    # within one run: the floor between windows against the frames done (the longest clip's repeats)
    out["window_floor_mb_per_1000_frames_per_repeat"] = [
        r.get("floor_growth_mb_per_1000_frames") for r in last["repeats"]
    ]
    for key in ("peak_memory_mb", "peak_anon_mb"):
        if key in first and key in last:
            out[key.replace("peak_", "").replace("_mb", "") + "_mb_per_1000_frames"] = round(
                (last[key] - first[key]) * scale, 2
            )
            out[key.replace("peak_", "").replace("_mb", "") + "_per_repeat"] = [
                round((b[key] - a[key]) * scale, 2) for a, b in zip(first["repeats"], last["repeats"])
            ]
    return out


def borders(args: argparse.Namespace) -> dict:
    """A FaceWorld clip edited in windows of ``--border-window`` frames and as one window: warp
    error (|Δ_t edited − Δ_t truth|, Δ_t the change from frame t to t+1) of the transitions in the
    windows' shared chunks against the others, and the attribute oracle's call of the target on
    the crops of each window border's two sides (the chunk before the shared one, the one after)."""
    from faceworld_quality import crops_of
    from faceworld import EDITS, HELD_OUT_IDS, caption, render_clip
    from faceworld.oracles import AttributeOracle
    from ipfacediff.job import SHIPPED_MODELS, edit_video, load_pipeline
    from ipfacediff.video import read_frames, write_video

    pipe = load_pipeline(None, device=args.device)
    oracle = AttributeOracle.from_pretrained(SHIPPED_MODELS / "oracles" / "attributes")
    work = Path(tempfile.mkdtemp(prefix="long-video-borders-"))
    cache = InversionCache(work / "cache")
    out = {"frames": args.border_frames, "window": args.border_window, "steps": args.border_steps, "edits": {}}
    windows = edit_windows(chunk_bounds(list(range(args.border_frames))), args.border_window)
    shared = [(windows[i + 1][0], windows[i][1]) for i in range(len(windows) - 1)]
    out["windows"], out["shared"] = windows, shared
    # transition t (frame t to t+1) is at a border when it touches a shared chunk
    at_border = np.zeros(args.border_frames - 1, dtype=bool)
    for begin, end in shared:
        at_border[max(0, begin - 1) : end] = True
    person = list(HELD_OUT_IDS)[args.border_person]
    clip = render_clip(person, seed=person, frames=args.border_frames, size=128, fps=12.0)
    source = write_video(work / "source.mp4", iter(clip), clip.fps)
    tracks_path = clip.tracks.save(work / "source.tracks.json")
    for name in args.border_edits.split(","):
        edit = EDITS[name]
        if edit.is_noop(clip.attributes[0]):
            continue
        truth = clip.with_edit(edit).array().astype(np.float64)
        runs = {}
        for label, window in (("windows", args.border_window), ("one_window", max(args.border_frames, 32))):
            settings = EditSettings(
                prompt=edit.target_caption(clip.attributes[0]),
                steps=args.border_steps,
                source_prompt=caption(clip.attributes[0]),
                adapters=name,
                window=window,
                hair=name == "blonde_hair",
            )
            started = time.perf_counter()
            edited_path = work / f"{name}-{label}.mp4"
            edit_video(
                source, edited_path, settings, pipeline=pipe, tracks_path=tracks_path, cache=cache, log=lambda _m: None
            )
            edited = read_frames(edited_path)
            change = np.abs(np.diff(edited.astype(np.float64), axis=0) - np.diff(truth, axis=0)).mean(axis=(1, 2, 3))
            probability = oracle.predict_proba(crops_of(edited, clip.tracks))[name]
            sides = [
                {
                    "before": round(float(probability[max(0, b - CACHE_CHUNK) : b].mean()), 3),
                    "after": round(float(probability[e : e + CACHE_CHUNK].mean()), 3),
                }
                for b, e in shared
            ]
            runs[label] = {
                "seconds": round(time.perf_counter() - started, 2),
                "warp_border": round(float(change[at_border].mean()), 4),
                "warp_inside": round(float(change[~at_border].mean()), 4),
                "warp_all": round(float(change.mean()), 4),
                "target_probability": round(float(probability.mean()), 3),
                "sides": sides,
                "flips": sum((s["before"] > 0.5) != (s["after"] > 0.5) for s in sides),
            }
            runs[label]["border_over_inside"] = round(runs[label]["warp_border"] / runs[label]["warp_inside"], 4)
            print(f"borders {name} {label}: {json.dumps(runs[label])}", flush=True)
        out["edits"][name] = runs
    return out


def child(args: argparse.Namespace) -> None:
    """Run one measurement in this process; its JSON is the last line of stdout."""
    result = inversion_sizes() if args.child == "sizes" else one_run(int(args.child), args)
    print(json.dumps(result))


def in_child(what: str, argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv, "--child", what], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {what} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="100,1000", help="clip lengths, comma-separated; ratios: last over first")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--full-size", action="store_true", help="SD-1.5 architecture at 512² (random weights, fp16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps (default 4: a short CPU run)")
    parser.add_argument(
        "--sd15-shapes",
        action="store_true",
        help="SD-1.5's shapes at narrow widths (512² crops, 4×64×64 latents, 64² feature tokens): host memory "
        "per frame as at full size, on a CPU",
    )
    parser.add_argument(
        "--size", type=int, default=32, help="crop side with the tiny models (default 32: a short CPU run)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=64,
        help="frames edited at once (--window of edit; default 64: every length in windows)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per length; seconds and peaks are their medians (a few MB of RSS is noise here)",
    )
    parser.add_argument(
        "--identity-gradient", type=float, default=None, help="identity guidance (default: the edit's; 0 = off)"
    )
    parser.add_argument(
        "--keep-latents",
        action="store_true",
        help="the result keeps the edited latents (the Python API's default; `ipfacediff edit` does not)",
    )
    parser.add_argument("--no-borders", action="store_true", help="skip the FaceWorld border measurement")
    parser.add_argument("--only-borders", action="store_true", help="only the FaceWorld border measurement")
    parser.add_argument("--border-frames", type=int, default=96)
    parser.add_argument("--border-window", type=int, default=48)
    parser.add_argument("--border-steps", type=int, default=20)
    parser.add_argument("--border-edits", default="eyeglasses", help="comma-separated FaceWorld edits")
    parser.add_argument("--border-person", type=int, default=0, help="index into FaceWorld's held-out people")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    lengths = [int(n) for n in args.frames.split(",")]
    forwarded = [
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--window",
        str(args.window),
        "--device",
        args.device,
    ]
    forwarded += ["--full-size"] if args.full_size else []
    forwarded += ["--sd15-shapes"] if args.sd15_shapes else []
    forwarded += ["--keep-latents"] if args.keep_latents else []
    forwarded += ["--identity-gradient", str(args.identity_gradient)] if args.identity_gradient is not None else []
    results: dict = {
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "full_size": args.full_size,
        "sd15_shapes": args.sd15_shapes,
        "resolution": 512 if args.full_size or args.sd15_shapes else args.size,
        "steps": args.steps,
        "window": args.window,
        "keep_latents": args.keep_latents,
        # glibc's mmap threshold: set low, freed tensors leave the resident set at once, so a window's
        # floor is what is alive rather than what the heap kept
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "runs": {},
    }

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    if args.only_borders:
        results = {"device": results["device"], "borders": borders(args)}
        return save()

    for n in lengths:
        repeats = [in_child(str(n), forwarded) for _ in range(args.repeat)]
        run = dict(repeats[0])
        for key in ("seconds", "peak_memory_mb", "peak_anon_mb"):
            if key in run:
                run[key] = float(np.median([r[key] for r in repeats]))
        kept = ("seconds", "peak_memory_mb", "peak_anon_mb", "floor_growth_mb_per_1000_frames")
        run["repeats"] = [{k: r[k] for k in kept if k in r} for r in repeats]
        results["runs"][str(n)] = run
        print(f"{n} frames: {json.dumps(run)}", flush=True)
        save()
    first, last = results["runs"][str(lengths[0])], results["runs"][str(lengths[-1])]

    def ratio(key: str) -> float | None:  # None: the shorter clip's figure is zero
        return round(last[key] / first[key], 3) if first.get(key) else None

    results["ratios"] = {
        f"rss_{lengths[-1]}_over_{lengths[0]}": ratio("peak_memory_mb"),
        f"time_{lengths[-1]}_over_{lengths[0]}": ratio("seconds"),
    }
    if "peak_anon_mb" in first:
        results["ratios"][f"anon_rss_{lengths[-1]}_over_{lengths[0]}"] = ratio("peak_anon_mb")
    results["growth"] = growth(results["runs"], lengths)
    print("growth:", json.dumps(results["growth"]), flush=True)
    save()
    results["sizes"] = in_child("sizes", [])
    results["estimate"] = estimate(results["sizes"])
    save()
    if not args.no_borders:
        results["borders"] = borders(args)
        save()

    print(f"device: {results['device']}, {results['resolution']}², {args.steps} steps, window {args.window}")
    print(f"{'frames':>8}{'seconds':>10}{'peak MB':>10}{'anon MB':>10}{'cache MB':>10}{'windows':>9}")
    for n, run in results["runs"].items():
        print(
            f"{n:>8}{run['seconds']:>10.2f}{run['peak_memory_mb']:>10.1f}{run.get('peak_anon_mb', 0):>10.1f}"
            f"{run['cache_bytes'] / 2**20:>10.1f}{run['windows']:>9}"
        )
    print("ratios:", json.dumps(results["ratios"]))
    print("estimate:", json.dumps(results["estimate"]))
    for name, runs in results.get("borders", {}).get("edits", {}).items():
        for label, run in runs.items():
            print(
                f"borders {name:<12}{label:<11} warp border {run['warp_border']:.3f} inside {run['warp_inside']:.3f}"
                f" ratio {run['border_over_inside']:.3f} flips {run['flips']}"
            )


if __name__ == "__main__":
    main()
