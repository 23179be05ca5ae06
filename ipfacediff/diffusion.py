"""Latent encoding, DDIM steps and cached DDIM inversion of video frames.

Inversion is the expensive, edit-independent part of every edit, so it runs once per clip and
model and is cached on disk step by step (safetensors): a second edit of the same clip makes no
UNet call, and an interrupted inversion resumes at the last finished step. While inverting, the
guiding UNet's decoder features are projected to a few dozen channels and cached too; the editing
stage finds its frame-to-keyframe correspondences in them without running the UNet again.

DDIM is written out here rather than through ``DDIMInverseScheduler`` because editing needs the
exact algebraic inverse of the sampling step on the sampler's own timesteps: with it the noise
each inversion step used can be recovered from two cached latents (:func:`eps_between`), and
sampling from the inverted latents with those recovered noises gives back the input exactly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ipfacediff.errors import UserError
from ipfacediff.files import check_writable_folder, short_detail, write_atomic

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances, e.g. to drive a progress bar."""

FEATURE_DIM = 64
# Frames per inversion cache entry. Entries hold the frames whose index in the video falls in one
# multiple of this, so an edit of an overlapping time range finds the same entries.
CACHE_CHUNK = 16


class StageTimer:
    """Seconds per named stage, summed over the stage's repeats.

    On a GPU the clock is read after the device has finished what the stage queued, so each stage
    is charged with its own kernels rather than the next stage's."""

    def __init__(self, device: torch.device | str | None = None, stages: tuple[str, ...] = ()):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = dict.fromkeys(stages, 0.0)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def default_cache_dir() -> Path:
    """$IPFACEDIFF_CACHE, else ~/.cache/ipfacediff: shared by every run of the same user."""
    return Path(os.environ.get("IPFACEDIFF_CACHE", Path.home() / ".cache" / "ipfacediff"))


CACHE_FIX = "pass --cache-dir with a folder you can write (or set IPFACEDIFF_CACHE)"


# ---------------------------------------------------------------------------------------------
# VAE and text encoder


@torch.no_grad()
def encode_frames(vae: AutoencoderKL, frames: np.ndarray | torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """RGB uint8 frames (N, H, W, 3) -> scaled latents (N, 4, H/f, W/f), float32 on the CPU.

    The latent mean is used, not a sample, so the same frames always give the same latents.
    """
    frames = torch.as_tensor(np.asarray(frames))
    device, dtype = vae.device, vae.dtype
    out = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size].to(device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
        out.append(vae.encode(chunk).latent_dist.mean.float().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, *, batch_size: int = 8) -> np.ndarray:
    """Scaled latents -> RGB uint8 frames (N, H, W, 3)."""
    out = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start : start + batch_size].to(vae.device, vae.dtype) / vae.config.scaling_factor
        image = vae.decode(chunk).sample.float().clamp(-1, 1)
        out.append(((image + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> CLIP hidden states (B, 77, D), as SD-1.x conditions on them.

    CLIP reads 77 tokens; a longer prompt is cut there, and where is said once, in one line (a
    warning of this module's logger: stderr), since an edit that ignores the end of its prompt
    looks like a failed edit.
    """
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    report_cut_prompts(tokenizer, prompts)
    return text_encoder(ids.to(text_encoder.device))[0]


_reported_prompts: set[str] = set()


def report_cut_prompts(tokenizer, prompts: list[str]) -> None:
    """Say, once per prompt, which words of a prompt longer than CLIP's 77 tokens are left out."""
    limit = tokenizer.model_max_length
    for prompt in prompts:
        if prompt in _reported_prompts:
            continue
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) <= limit:
            continue
        _reported_prompts.add(prompt)
        words = tokenizer.decode(ids[limit - 1 : -1], clean_up_tokenization_spaces=True).split()
        cut = " ".join(words[:6]) + (" …" if len(words) > 6 else "")
        logger.warning(
            f'note: the prompt is {len(ids)} tokens long and CLIP reads {limit}: from "{cut}" on it is left out; '
            "shorten the prompt to keep it"
        )


# ---------------------------------------------------------------------------------------------
# DDIM


PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def check_scheduler(scheduler: DDIMScheduler) -> None:
    """Refuse, before any work, a schedule the DDIM maths here cannot drive.

    The model's output must give the noise ε: an ε model's does, a v model's does with the latent
    it was given (:func:`predicted_noise`); an x₀ ("sample") model's would only through 1/√(1−ᾱ),
    which at the clean end of the schedule blows its error up; SD-1.x fine-tunes predict ε or v.
    """
    config = scheduler.config
    if config.prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"the model's scheduler has prediction_type {config.prediction_type!r}: ipfacediff drives SD-1.x models "
            "that predict the noise ('epsilon') or the velocity ('v_prediction'); use one of those"
        )
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(
            f"the model's scheduler has timestep_spacing {config.timestep_spacing!r}: use one of "
            f"{', '.join(TIMESTEP_SPACINGS)} in scheduler/scheduler_config.json"
        )


def predicted_noise(
    output: torch.Tensor, x_t: torch.Tensor, alpha_t: float | torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise ε in a UNet's ``output`` for input ``x_t`` at level ᾱ_t.

    A v-prediction model (v = √ᾱ·ε − √(1−ᾱ)·x₀) gives ε = √ᾱ·v + √(1−ᾱ)·x_t, exactly, so every
    step here (and the inversion's exact reversal) works on ε whatever the model predicts. The
    map is affine with weights that do not depend on the prompt, so classifier-free guidance on v
    and on ε agree.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_t**0.5 * output + (1 - alpha_t) ** 0.5 * x_t
    raise UserError(f"prediction_type {prediction_type!r} is not one ipfacediff drives: {', '.join(PREDICTION_TYPES)}")


def sampling_timesteps(scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    """The sampler's timesteps for ``steps`` steps, noisiest first, without the ones that step nowhere.

    A step goes from its timestep's ᾱ to the next one's (the last to ``final_alpha_cumprod``). Some
    schedules give a step whose two levels are the same: ``linspace`` ends on t = 0, and with
    ``set_alpha_to_one: false`` the final level is ᾱ₀ too; ``leading`` with ``steps_offset: 1`` at
    as many steps as levels asks for t = 1000, past the last one. Such a step changes nothing when
    sampling (diffusers' DDIM step makes the same latent there) but its noise cannot be recovered
    from two equal latents (:func:`eps_between`), so it is left out: the chain of levels stays the
    one the scheduler gives. The terminal level of a zero-terminal-SNR schedule
    (``rescale_betas_zero_snr``, ᾱ = 0) is left out too: nothing of the frames is left there, so
    no inversion can reach it and come back; the edit starts from the level below.
    """
    levels = scheduler.config.num_train_timesteps
    if steps > levels:
        raise UserError(f"--steps {steps} is more than the model's {levels} noise levels: use at most {levels}")
    check_scheduler(scheduler)
    scheduler.set_timesteps(steps)
    inside = [t for t in scheduler.timesteps.tolist() if 0 <= t < levels]
    alphas = [float(scheduler.alphas_cumprod[t]) for t in inside] + [float(scheduler.final_alpha_cumprod)]
    kept = [t for index, t in enumerate(inside) if 0 < alphas[index] < alphas[index + 1]]
    return torch.tensor(kept, dtype=scheduler.timesteps.dtype)


def alpha_pairs(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> list[tuple[float, float]]:
    """(ᾱ_t, ᾱ_prev) for every sampling timestep: the DDIM step goes from level t to level prev."""
    cumprod = scheduler.alphas_cumprod
    final = float(scheduler.final_alpha_cumprod)
    pairs = []
    for index, t in enumerate(timesteps.tolist()):
        prev = timesteps[index + 1].item() if index + 1 < len(timesteps) else None
        pairs.append((float(cumprod[t]), float(cumprod[prev]) if prev is not None else final))
    return pairs


def schedule_record(scheduler: DDIMScheduler, steps: int) -> dict:
    """What an edit's DDIM made of the model's schedule, for the run's metadata."""
    config = scheduler.config
    converted = config.prediction_type == "v_prediction"
    return {
        "prediction_type": config.prediction_type,
        "noise": "from v and x_t: eps = sqrt(a)*v + sqrt(1-a)*x_t" if converted else "the model's output",
        "timestep_spacing": config.timestep_spacing,
        "ddim_steps": len(sampling_timesteps(scheduler, steps)),
    }


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_prev: float) -> torch.Tensor:
    """Deterministic DDIM step (η = 0) from level ᾱ_t to the less noisy ᾱ_prev."""
    x0 = (x_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def ddim_inverse_step(x_prev: torch.Tensor, eps: torch.Tensor, alpha_prev: float, alpha_t: float) -> torch.Tensor:
    """Exact inverse of :func:`ddim_step` for the same ``eps``: from ᾱ_prev up to ᾱ_t."""
    x0 = (x_prev - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
    return alpha_t**0.5 * x0 + (1 - alpha_t) ** 0.5 * eps


def eps_between(x_prev: torch.Tensor, x_t: torch.Tensor, alpha_prev: float, alpha_t: float) -> torch.Tensor:
    """The noise that maps ``x_prev`` to ``x_t`` in :func:`ddim_inverse_step` (and back)."""
    a, b = (alpha_t / alpha_prev) ** 0.5, (1 - alpha_t) ** 0.5 - (alpha_t * (1 - alpha_prev) / alpha_prev) ** 0.5
    return (x_t - a * x_prev) / b


# ---------------------------------------------------------------------------------------------
# Cached inversion


@dataclass
class InvertedVideo:
    """Per-step latents of an inverted clip, and the guiding UNet's projected decoder features.

    ``latents[i]`` is at the noise level of ``timesteps[i]`` (noisiest first); ``clean`` is the
    encoded clip. ``features`` maps a step index to (N, tokens, FEATURE_DIM) float16.
    """

    timesteps: torch.Tensor
    latents: list[torch.Tensor]
    clean: torch.Tensor
    alphas: list[tuple[float, float]]
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    unet_calls: int = 0
    cache_key: str | None = None  # its folder in the InversionCache, when it has one
    # Steps read from the cache rather than computed (a resumed run reuses some); averaged over
    # the frames when the clip was put together from several cache entries.
    reused_steps: float = 0
    # (first row, end row, cache key or None, steps read from the cache) of each cache entry the
    # rows came from.
    chunks: list[tuple[int, int, str | None, int]] = field(default_factory=list)
    # Rows that are frames of the clip; rows after them are another window's anchor keyframes.
    frame_count: int | None = None

    @property
    def count(self) -> int:
        """Frames of the clip (or window), not counting appended anchor rows."""
        return len(self.clean) if self.frame_count is None else self.frame_count

    @property
    def reused_share(self) -> float:
        """Share of the inversion's steps that came from the cache: 1 for a re-edit, in between
        for a run resumed after a kill."""
        return self.reused_steps / len(self.latents) if self.latents else 0.0

    def source_eps(self, step: int) -> torch.Tensor:
        """The noise that takes the source latents from step ``step`` to the next, less noisy one."""
        alpha_t, alpha_prev = self.alphas[step]
        lower = self.latents[step + 1] if step + 1 < len(self.latents) else self.clean
        return eps_between(lower, self.latents[step], alpha_prev, alpha_t)

    def features_at(self, step: int) -> torch.Tensor:
        """Correspondence features of the captured step nearest to ``step``."""
        nearest = min(self.features, key=lambda captured: (abs(captured - step), captured))
        return self.features[nearest]


class InversionCache:
    """One folder per (chunk of frames, model, resolution, steps, prompt) of named safetensors
    files: ``clean`` (the encoded frames) and ``step_XXXX`` (latents, and features where captured).

    Files are written whole (temporary name, then renamed), so a killed run leaves only whole steps.
    A file that cannot be read all the same (truncated by a full disk or a copy, overwritten) is
    removed with one warning line and computed again, so the cache heals itself. With
    ``max_bytes`` the entries used longest ago are removed to make room for a new file, never one
    this object has read or written (the running job's); a file that would not fit even then is
    not written, and the job goes on without caching it.

    The folder is created and tried at once: a cache that cannot be written is one line before
    any model is loaded (every front end makes its cache first), not a traceback mid-run.
    """

    def __init__(self, root: str | Path | None = None, *, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_cache_dir() / "inversion"
        check_writable_folder(self.root, "the inversion cache", CACHE_FIX, create=True)
        self.max_bytes = max_bytes
        self.in_use: set[str] = set()
        self._size: int | None = None  # bytes on disk, counted once and then kept up to date

    @staticmethod
    def key(**parts: object) -> str:
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def folder(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, name: str) -> dict[str, torch.Tensor] | None:
        path = self.folder(key) / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            # Cloned: memory-mapped tensors can be unaligned, and CPU kernels then round differently.
            tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
        except FileNotFoundError:  # evicted by another process sharing the cache
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            self.drop_damaged(path, error)
            return None
        self.mark_used(key)
        return tensors

    def drop_damaged(self, path: Path, error: BaseException) -> None:
        """Remove a cache file that cannot be read, saying so in one line; its caller computes it again."""
        detail = error.strerror if isinstance(error, OSError) and error.strerror else short_detail(error)
        print(
            f"warning: the inversion cache file {path} is damaged ({detail}); it is removed and computed again",
            file=sys.stderr,
        )
        try:
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: the new copy replaces it
            pass
        self._size = None  # counted again when next asked

    def save(self, key: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        data = save({k: v.contiguous() for k, v in tensors.items()})
        self.in_use.add(key)
        if not self.make_room(len(data)):
            return
        folder = self.folder(key)
        try:
            for attempt in range(2):  # another process sharing the cache may evict the folder meanwhile
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    write_atomic(folder / f"{name}.safetensors", data)
                    break
                except FileNotFoundError:
                    if attempt:
                        raise
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    f"the disk of the inversion cache {self.root} is full; what was cached is kept: "
                    "free space, pass --cache-max-gb or choose another --cache-dir"
                ) from None
            raise UserError(
                f"the inversion cache {self.root} cannot be written ({error.strerror or error}); {CACHE_FIX}"
            ) from None
        self._size = self.size_bytes() + len(data)
        self.mark_used(key)

    def mark_used(self, key: str) -> None:
        """Record the entry's last use (its folder's time) and protect it from this job's evictions."""
        self.in_use.add(key)
        try:
            os.utime(self.folder(key))
        except OSError:  # evicted meanwhile, or another user's entry: its age only guides eviction
            pass

    def entries(self) -> list[tuple[float, str, int]]:
        """(last use, key, bytes) of every entry, least recently used first."""
        found = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if folder.is_dir():
                try:
                    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                    found.append((folder.stat().st_mtime, folder.name, size))
                except FileNotFoundError:  # removed meanwhile by another process
                    continue
        return sorted(found)

    def size_bytes(self) -> int:
        """Bytes the cache takes on disk."""
        if self._size is None:
            self._size = sum(size for _, _, size in self.entries())
        return self._size

    def make_room(self, incoming: int) -> bool:
        """Evict least recently used entries until ``incoming`` more bytes fit under ``max_bytes``;
        False when they cannot (what is left is in use by this job)."""
        if self.max_bytes is None or self.size_bytes() + incoming <= self.max_bytes:
            return True
        import shutil

        entries = self.entries()
        total = sum(size for _, _, size in entries)
        for _, key, size in entries:
            if total + incoming <= self.max_bytes:
                break
            if key in self.in_use:
                continue
            shutil.rmtree(self.folder(key), ignore_errors=True)
            total -= size
        self._size = total
        return total + incoming <= self.max_bytes


def chunk_bounds(frame_indices: Sequence[int], size: int = CACHE_CHUNK) -> list[tuple[int, int]]:
    """(start, end) positions of runs of ``frame_indices`` (ascending video frame numbers) that
    fall in the same multiple of ``size``: the frames of one cache entry."""
    bounds, start = [], 0
    for position in range(1, len(frame_indices) + 1):
        if position == len(frame_indices) or frame_indices[position] // size != frame_indices[start] // size:
            bounds.append((start, position))
            start = position
    return bounds


def frames_digest(frames: np.ndarray) -> str:
    """Content hash of the exact pixels that get inverted."""
    frames = np.ascontiguousarray(frames)
    digest = hashlib.sha256(str(frames.shape).encode())
    digest.update(frames.tobytes())
    return digest.hexdigest()[:24]


def feature_projection(channels: int, dim: int = FEATURE_DIM, seed: int = 0) -> torch.Tensor:
    """A fixed random orthonormal map channels -> dim: keeps cosine similarities, shrinks the cache."""
    if channels <= dim:
        return torch.eye(channels)
    gaussian = torch.randn(channels, dim, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(gaussian).Q


@contextmanager
def capture_output(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the outputs of ``module`` while the context is open; the hook is always removed."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def default_feature_steps(steps: int, count: int = 10) -> list[int]:
    """Which inversion steps keep correspondence features: about ``count``, spread evenly."""
    return sorted({round(i * (steps - 1) / max(count - 1, 1)) for i in range(min(count, steps))})


@torch.no_grad()
def invert_frames(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    clean: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    steps: int,
    cache: InversionCache | None = None,
    cache_key: str | None = None,
    batch_size: int = 8,
    feature_steps: list[int] | None = None,
    progress: Progress | None = None,
) -> InvertedVideo:
    """DDIM-invert clean latents (N, 4, h, w) through every sampling step, cached and resumable.

    ``prompt_embeds`` is (1, 77, D): the inversion prompt, usually the empty one. Features of the
    UNet's last decoder block are kept at ``feature_steps`` (indices into the noisiest-first
    timesteps; default: about ten, evenly spread). The inversion has one step per timestep of
    :func:`sampling_timesteps`, which can be fewer than ``steps``.
    """
    timesteps = sampling_timesteps(scheduler, steps)
    alphas = alpha_pairs(scheduler, timesteps)
    prediction = scheduler.config.prediction_type
    steps = len(timesteps)
    feature_steps = default_feature_steps(steps) if feature_steps is None else feature_steps
    projection = feature_projection(unet.config.block_out_channels[0]).to(unet.device, unet.dtype)
    count = len(clean)
    # Ascending order: inversion step j produces the latents of timesteps[steps - 1 - j].
    latents_by_step: dict[int, torch.Tensor] = {}
    features: dict[int, torch.Tensor] = {}
    current = clean
    calls = reused = 0
    for j in range(steps):
        step = steps - 1 - j
        cached = cache.load(cache_key, f"step_{step:04d}") if cache is not None and cache_key else None
        if cached is not None:
            current = cached["latents"]
            latents_by_step[step] = current
            if "features" in cached:
                features[step] = cached["features"]
            reused += 1
            if progress:
                progress("invert", j + 1, steps)
            continue
        alpha_t, alpha_prev = alphas[step]
        t = timesteps[step]
        next_latents, step_features = [], []
        with capture_output(unet.up_blocks[-1]) as captured:
            for start in range(0, count, batch_size):
                batch = current[start : start + batch_size].to(unet.device, unet.dtype)
                emb = prompt_embeds.to(unet.device, unet.dtype).expand(len(batch), -1, -1)
                output = unet(batch, t, encoder_hidden_states=emb).sample
                calls += 1
                eps = predicted_noise(output.float(), batch.float(), alpha_t, prediction)
                next_latents.append(ddim_inverse_step(batch.float(), eps, alpha_prev, alpha_t).cpu())
                if step in feature_steps:
                    hidden = captured.pop()
                    tokens = hidden.flatten(2).transpose(1, 2) @ projection
                    step_features.append(tokens.to(torch.float16).cpu())
                captured.clear()
        # Row-major like the cached copy: CPU kernels round differently on channels-last inputs,
        # and a re-edit from the cache must match the first edit bit for bit.
        current = torch.cat(next_latents).contiguous()
        latents_by_step[step] = current
        tensors = {"latents": current}
        if step_features:
            features[step] = tensors["features"] = torch.cat(step_features)
        if cache is not None and cache_key:
            cache.save(cache_key, f"step_{step:04d}", tensors)
        if progress:
            progress("invert", j + 1, steps)
    return InvertedVideo(
        timesteps=timesteps,
        latents=[latents_by_step[i] for i in range(steps)],
        clean=clean,
        alphas=alphas,
        features=features,
        unet_calls=calls,
        cache_key=cache_key if cache is not None else None,
        reused_steps=reused,
    )


def join_inverted(
    pieces: Iterator[tuple[int, int, InvertedVideo]], count: int, anchors: InvertedVideo | None = None
) -> InvertedVideo:
    """One clip's inversion from the inversions of its cache chunks (first row, end row, piece),
    with ``anchors``' rows appended after its ``count`` frames. Each piece is copied into tensors
    made once and then dropped: holding all pieces and their concatenation would double the peak."""
    joined: InvertedVideo | None = None
    reused = 0
    extra = len(anchors.clean) if anchors is not None else 0

    def rows_like(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.new_empty(count + extra, *tensor.shape[1:])

    for begin, end, piece in pieces:
        if joined is None:
            joined = InvertedVideo(
                timesteps=piece.timesteps,
                latents=[rows_like(x) for x in piece.latents],
                clean=rows_like(piece.clean),
                alphas=piece.alphas,
                features={s: rows_like(f) for s, f in piece.features.items()},
                frame_count=count if extra else None,
            )
        for whole, part in zip(joined.latents, piece.latents):
            whole[begin:end] = part
        joined.clean[begin:end] = piece.clean
        for step, part in piece.features.items():
            joined.features[step][begin:end] = part
        joined.unet_calls += piece.unet_calls
        joined.chunks.append((begin, end, piece.cache_key, int(piece.reused_steps)))
        reused += int(piece.reused_steps) * (end - begin)
    assert joined is not None, "no frames to invert"
    joined.reused_steps = reused / count
    if len(joined.chunks) == 1:
        joined.cache_key = joined.chunks[0][2]
    if anchors is not None:
        for whole, part in zip(joined.latents, anchors.latents):
            whole[count:] = part
        joined.clean[count:] = anchors.clean
        for step, part in anchors.features.items():
            joined.features[step][count:] = part
    return joined


def select_rows(inverted: InvertedVideo, rows: list[int]) -> InvertedVideo:
    """The inversion of some frames of a clip only (a window's anchor keyframes), copied."""
    return InvertedVideo(
        timesteps=inverted.timesteps,
        latents=[x[rows].clone() for x in inverted.latents],
        clean=inverted.clean[rows].clone(),
        alphas=inverted.alphas,
        features={s: f[rows].clone() for s, f in inverted.features.items()},
    )


@torch.no_grad()
def sample_from_inverted(
    unet: UNet2DConditionModel,
    inverted: InvertedVideo,
    prompt_embeds: torch.Tensor,
    *,
    prediction_type: str,
    batch_size: int = 8,
) -> torch.Tensor:
    """Plain DDIM sampling from the noisiest inverted latents, no guidance: the reconstruction.
    ``prediction_type``: what the UNet predicts (its scheduler's)."""
    current = inverted.latents[0]
    for step, t in enumerate(inverted.timesteps):
        alpha_t, alpha_prev = inverted.alphas[step]
        out = []
        for start in range(0, len(current), batch_size):
            batch = current[start : start + batch_size].to(unet.device, unet.dtype)
            emb = prompt_embeds.to(unet.device, unet.dtype).expand(len(batch), -1, -1)
            output = unet(batch, t, encoder_hidden_states=emb).sample
            eps = predicted_noise(output.float(), batch.float(), alpha_t, prediction_type)
            out.append(ddim_step(batch.float(), eps, alpha_t, alpha_prev).cpu())
        current = torch.cat(out)
    return current


def ddim_walk(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    levels: list[int],
    *,
    prediction_type: str,
) -> torch.Tensor:
    """Deterministic DDIM from timestep ``levels[0]`` to ``levels[-1]`` through the levels between:
    ascending it inverts, descending it samples. Level 0 is the clean latent itself (ᾱ = 1), so a
    walk can start or end exactly on the image, at any levels rather than the sampler's.

    The UNet runs on ``latents`` cast to ``prompt_embeds``' dtype, the steps in float32; gradients
    flow through every step unless the caller turns them off (a trainer regenerating with them).
    A v-prediction UNet's output is read at the ᾱ of the timestep it was given, ᾱ₀ at level 0.
    """

    def alpha(t: int) -> float:
        return 1.0 if t == 0 else float(alphas_cumprod[t])

    x = latents
    embeds = prompt_embeds.expand(len(x), -1, -1)
    for t, following in zip(levels[:-1], levels[1:]):
        output = unet(x.to(embeds.dtype), t, encoder_hidden_states=embeds).sample.float()
        eps = predicted_noise(output, x, float(alphas_cumprod[t]), prediction_type)
        x = ddim_step(x, eps, alpha(t), alpha(following))
    return x
