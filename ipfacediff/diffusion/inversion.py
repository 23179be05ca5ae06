"""Cached DDIM inversion of a clip's frames, and the guiding UNet's correspondence features.

Inversion is the expensive, edit-independent part of every edit, so it runs once per clip and
model and is cached on disk step by step (:class:`~ipfacediff.diffusion.cache.InversionCache`):
a second edit of the same clip makes no UNet call, and an interrupted inversion resumes at the
last finished step. While inverting, the guiding UNet's decoder features are projected to a few
dozen channels and cached too; the editing stage finds its frame-to-keyframe correspondences in
them without running the UNet again. The projection is the features' own principal directions
(:func:`feature_basis`), fitted on each cached chunk of frames and brought to one basis for the
whole clip when chunks are joined (:func:`common_feature_basis`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ipfacediff.diffusion.cache import InversionCache
from ipfacediff.diffusion.ddim import (
    alpha_pairs,
    ddim_inverse_step,
    ddim_step,
    eps_between,
    predicted_noise,
    sampling_timesteps,
)
from ipfacediff.diffusion.timing import Progress


FEATURE_DIM = 64


@dataclass
class InvertedVideo:
    """Per-step latents of an inverted clip, and the guiding UNet's projected decoder features.

    ``latents[i]`` is at the noise level of ``timesteps[i]`` (noisiest first); ``clean`` is the
    encoded clip. ``features`` maps a step index to (N, tokens, D) float16, D = min(channels,
    FEATURE_DIM), the coordinates of the decoder's features in ``feature_bases[step]``, an
    orthonormal (channels, D) float32 basis (:func:`feature_basis`).
    """

    timesteps: torch.Tensor
    latents: list[torch.Tensor]
    clean: torch.Tensor
    alphas: list[tuple[float, float]]
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    feature_bases: dict[int, torch.Tensor] = field(default_factory=dict)
    unet_calls: int = 0
    cache_key: str | None = None  # its folder in the InversionCache, when it has one
    # Steps read from the cache rather than computed (a resumed run reuses some); averaged over
    # the frames when the clip was put together from several cache entries.
    reused_steps: float = 0
    # (first row, end row, cache key or None, steps read from the cache) of each cache entry the
    # rows came from.
    chunks: list[tuple[int, int, str | None, int]] = field(default_factory=list)

    @property
    def reused_share(self) -> float:
        """Share of the inversion's steps that came from the cache: 1 for a re-edit, in between
        for a run resumed after a kill."""
        return self.reused_steps / len(self.latents) if self.latents else 0.0

    def chunk_keys(self) -> list[str] | None:
        """The cache keys of the entries its rows came from, in order; None when any rows were not
        cached: what a store of something computed from this inversion keys its entry by."""
        keys = [key for _, _, key, _ in self.chunks] or [self.cache_key]
        return keys if all(keys) else None

    def source_eps(self, step: int) -> torch.Tensor:
        """The noise that takes the source latents from step ``step`` to the next, less noisy one."""
        alpha_t, alpha_prev = self.alphas[step]
        lower = self.latents[step + 1] if step + 1 < len(self.latents) else self.clean
        return eps_between(lower, self.latents[step], alpha_prev, alpha_t)

    def features_at(self, step: int) -> torch.Tensor:
        """Correspondence features of the captured step nearest to ``step``."""
        nearest = min(self.features, key=lambda captured: (abs(captured - step), captured))
        return self.features[nearest]


def feature_basis(gram: torch.Tensor, dim: int = FEATURE_DIM) -> torch.Tensor:
    """The ``dim`` principal directions (uncentred) of features whose Gram matrix Σ xᵀx is ``gram``
    (channels, channels): an orthonormal (channels, dim) float32 basis, the identity when the
    features have no more than ``dim`` channels.

    Correspondences are the cosine nearest neighbours of the features; the directions that hold
    most of their energy keep those cosines best. A fixed random map keeps them only on average:
    from SD's 320 channels to 64 it moves near-ties enough to change many tokens' neighbours.
    """
    channels = gram.shape[0]
    if channels <= dim:
        return torch.eye(channels)
    _, vectors = torch.linalg.eigh(gram.double())  # ascending eigenvalues
    return vectors[:, -dim:].flip(-1).float().contiguous()


def gram_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """Σ xᵀx over the tokens (..., channels), in float32: what :func:`feature_basis` is fitted on."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    return (flat.T @ flat).cpu()


def common_feature_basis(parts: list[tuple[torch.Tensor, torch.Tensor]], dim: int = FEATURE_DIM) -> torch.Tensor:
    """One basis for features held in several bases: (coordinates (..., d), basis (channels, d))
    per part, e.g. the cache chunks of a clip. Each chunk's basis is fitted on its own frames, so
    frames of two chunks are only comparable in a shared one; it is fitted, like each chunk's, on
    the Gram matrix of all their (reconstructed) features, so no chunk's full features are needed.
    """
    gram = sum(basis @ gram_matrix(coordinates) @ basis.T for coordinates, basis in parts)
    return feature_basis(gram, dim)


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
    count = len(clean)
    # Ascending order: inversion step j produces the latents of timesteps[steps - 1 - j].
    latents_by_step: dict[int, torch.Tensor] = {}
    features: dict[int, torch.Tensor] = {}
    bases: dict[int, torch.Tensor] = {}
    current = clean
    calls = reused = 0
    for j in range(steps):
        step = steps - 1 - j
        cached = cache.load(cache_key, f"step_{step:04d}") if cache is not None and cache_key else None
        if cached is not None:
            current = cached["latents"]
            latents_by_step[step] = current
            if "features" in cached:
                features[step], bases[step] = cached["features"], cached["feature_basis"]
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
                    step_features.append(captured.pop().flatten(2).transpose(1, 2))
                captured.clear()
        # Row-major like the cached copy: CPU kernels round differently on channels-last inputs,
        # and a re-edit from the cache must match the first edit bit for bit.
        current = torch.cat(next_latents).contiguous()
        latents_by_step[step] = current
        tensors = {"latents": current}
        if step_features:
            # The chunk's full features live only here, one step at a time: fitted on, then projected.
            tokens = torch.cat(step_features).float()
            step_features.clear()
            basis = feature_basis(gram_matrix(tokens))
            features[step] = tensors["features"] = (tokens @ basis.to(tokens.device)).to(torch.float16).cpu()
            bases[step] = tensors["feature_basis"] = basis
            del tokens
        if cache is not None and cache_key:
            cache.save(cache_key, f"step_{step:04d}", tensors, dtype=unet.dtype)
        if progress:
            progress("invert", j + 1, steps)
    return InvertedVideo(
        timesteps=timesteps,
        latents=[latents_by_step[i] for i in range(steps)],
        clean=clean,
        alphas=alphas,
        features=features,
        feature_bases=bases,
        unet_calls=calls,
        cache_key=cache_key if cache is not None else None,
        reused_steps=reused,
    )


def join_inverted(pieces: Iterator[tuple[int, int, InvertedVideo]], count: int) -> InvertedVideo:
    """One clip's inversion of ``count`` frames from the inversions of its cache chunks (first row,
    end row, piece). Each piece is copied into tensors made once and then dropped: holding all
    pieces and their concatenation would double the peak. Features of chunks fitted in different
    bases are brought to one (:func:`common_feature_basis`)."""
    joined: InvertedVideo | None = None
    reused = 0
    bases: dict[int, list[tuple[int, int, torch.Tensor]]] = {}

    def rows_like(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.new_empty(count, *tensor.shape[1:])

    for begin, end, piece in pieces:
        if joined is None:
            joined = InvertedVideo(
                timesteps=piece.timesteps,
                latents=[rows_like(x) for x in piece.latents],
                clean=rows_like(piece.clean),
                alphas=piece.alphas,
                features={s: rows_like(f) for s, f in piece.features.items()},
            )
        for whole, part in zip(joined.latents, piece.latents):
            whole[begin:end] = part
        joined.clean[begin:end] = piece.clean
        for step, part in piece.features.items():
            joined.features[step][begin:end] = part
            bases.setdefault(step, []).append((begin, end, piece.feature_bases[step]))
        joined.unet_calls += piece.unet_calls
        joined.chunks.append((begin, end, piece.cache_key, int(piece.reused_steps)))
        reused += int(piece.reused_steps) * (end - begin)
    assert joined is not None, "no frames to invert"
    for step, parts in bases.items():
        joined.feature_bases[step] = join_feature_bases(joined.features[step], parts)
    joined.reused_steps = reused / count
    if len(joined.chunks) == 1:
        joined.cache_key = joined.chunks[0][2]
    return joined


def join_feature_bases(features: torch.Tensor, parts: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """The basis of one step's joined features (N, tokens, D), rows ``begin:end`` of which are in
    their chunk's ``basis``: the chunks' shared basis, the rows converted to it in place."""
    first = parts[0][2]
    if all(torch.equal(basis, first) for _, _, basis in parts[1:]):
        return first
    common = common_feature_basis([(features[begin:end], basis) for begin, end, basis in parts])
    for begin, end, basis in parts:
        features[begin:end] = (features[begin:end].float() @ (basis.T @ common)).to(features.dtype)
    return common


def select_rows(inverted: InvertedVideo, rows: list[int]) -> InvertedVideo:
    """The inversion of some frames of a clip only, copied."""
    return InvertedVideo(
        timesteps=inverted.timesteps,
        latents=[x[rows].clone() for x in inverted.latents],
        clean=inverted.clean[rows].clone(),
        alphas=inverted.alphas,
        features={s: f[rows].clone() for s, f in inverted.features.items()},
        feature_bases=dict(inverted.feature_bases),
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
