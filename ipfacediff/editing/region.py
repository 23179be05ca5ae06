"""Where the edit acts and what it leaves alone: the local blend's edit region (DiffEdit's prompt
differences), and the detail the VAE loses put back outside it."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ipfacediff.adapters.words import FRAME_WORDS
from ipfacediff.diffusion import InversionCache, InvertedVideo, Progress, StageTimer, encode_prompt, predicted_noise
from ipfacediff.editing.plan import EditPlan
from ipfacediff.editing.propagation import smooth_over_time
from ipfacediff.editing.windows import EditWindow
from ipfacediff.face import inner_face_share
from ipfacediff.models import is_compiled, module_fingerprint
from ipfacediff.settings import DEFAULT_BLEND_THRESHOLD, EditSettings


# Pixels the edit changed by more than this (0-255, blurred) take none of the source's detail.
DETAIL_TOLERANCE = 24.0


# Timesteps at which that difference is measured (on the inverted latents), averaged.
BLEND_TIMESTEPS = (300, 500, 700)


# How often the region's per-frame level is filtered over time with the temporal smoothing's
# [w, 1 − 2w, w] (w = 0.25: 8 passes ≈ a Gaussian of σ = 2 frames); tuned on blonde hair, the
# largest region (benchmarks/README.md).
MASK_SMOOTHING_PASSES = 8


# Bumped whenever what the reference branch's store holds changes, so that an older entry is not read.
REFERENCE_NOISE_VERSION = 1


class ReferenceNoiseStore:
    """ε2's noise prediction under the local blend's reference prompt at each level of
    :data:`BLEND_TIMESTEPS`, kept in the inversion cache beside the window's inversion. It depends
    on the source latents, the reference text and ε2 with its adapters, not on the prompt, so a
    re-edit whose reference is the same (the same subject words or source prompt, the same ε2
    adapters) runs only the prompt's branch. What decides its rounding is in the key too: the
    batches it was measured in (a UNet rounds by its batch), the rows known from a window before.
    Without a cache, or for a window whose inversion is not cached, nothing is kept."""

    def __init__(self, cache: InversionCache | None, inverted: InvertedVideo, unet: torch.nn.Module, **parts: object):
        chunks = inverted.chunk_keys()
        self.cache = cache if chunks else None
        if self.cache is None:
            return
        self.key = InversionCache.key(
            reference_noise=REFERENCE_NOISE_VERSION,
            chunks=chunks,
            unet=module_fingerprint(unet),
            dtype=str(unet.dtype),
            **({"compiled": True} if is_compiled(unet) else {}),
            **parts,
        )

    def load(self, levels: list[int], shape: tuple[int, ...]) -> dict[int, torch.Tensor] | None:
        """The stored noise of each of ``levels`` ((rows, C, h, w) each), None when there is none."""
        stored = self.cache.load(self.key, "reference_noise") if self.cache is not None else None
        if stored is None or sorted(stored) != sorted(f"level_{level:04d}" for level in levels):
            return None
        noise = {level: stored[f"level_{level:04d}"] for level in levels}
        return noise if all(tuple(n.shape) == shape for n in noise.values()) else None

    def save(self, noise: dict[int, torch.Tensor]) -> None:
        if self.cache is not None:
            self.cache.save(self.key, "reference_noise", {f"level_{level:04d}": n for level, n in noise.items()})


def mask_reference_prompt(prompt: str, source_prompt: str = "") -> str:
    """What the local blend compares the prompt with: the source prompt, or when there is none,
    the prompt's subject alone (its :data:`FRAME_WORDS`: "a face with eyeglasses" → "a face with")."""
    if source_prompt.strip():
        return source_prompt
    words = "".join(ch if ch.isalnum() else " " for ch in prompt.lower()).split()
    return " ".join(w for w in words if w in FRAME_WORDS)


def local_blend_mask(
    difference: torch.Tensor, threshold: float, *, temporal_smoothing: float = 0.0, passes: int = MASK_SMOOTHING_PASSES
) -> torch.Tensor:
    """(N, 1, h, w) mean |ε(prompt) − ε(reference)| → (N, 1, h, w) float mask: 1 where the edit
    may change the latents (above ``threshold`` of the frame's range), dilated by one token so
    that the edit's border lies inside, its edge softened over one more.

    With ``temporal_smoothing`` (aligned crops: one token, one place on the face) each frame's
    normalised difference is first filtered over time (:func:`smooth_over_time`, ``passes``
    times): a token near the threshold would otherwise fall in and out of the region from one
    frame to the next, and on the coarse latent grid that is a 4-8 px block of the edit blinking."""
    low = difference.amin(dim=(2, 3), keepdim=True)
    high = difference.amax(dim=(2, 3), keepdim=True)
    level = (difference - low) / (high - low).clamp_min(1e-8)
    for _ in range(passes):
        level = smooth_over_time(level, temporal_smoothing)
    mask = (level > threshold).float()
    mask = F.max_pool2d(mask, 3, stride=1, padding=1)
    return F.avg_pool2d(F.pad(mask, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def transfer_detail(
    source: np.ndarray,
    edited: np.ndarray,
    reconstruction: np.ndarray,
    *,
    tolerance: float = DETAIL_TOLERANCE,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> np.ndarray:
    """``edited`` with the detail the VAE loses put back where the edit left the picture alone.

    Every output pixel goes through the VAE decoder, which loses fine detail (skin texture, an
    iris, a freckle) that identity rests on, even where nothing was edited. ``reconstruction`` is
    the decoder's picture of the unedited latents, so ``source − reconstruction`` is exactly that
    loss; it is added back with weight 1 where the edit did not change the decoded picture,
    fading to 0 where it changed it by ``tolerance`` or more (new glasses, a new hair colour must
    not show the old detail through). Unedited regions come out as the source, bit for bit.
    All arrays (N, H, W, 3) uint8; the arithmetic runs on ``device``, where the decoded frames
    are (done in numpy on the host it took about a second for 40 frames of 512², next to the
    decoder's 0.6 s on an H100).
    """
    sigma = max(0.5, source.shape[1] / 64)
    radius = int(round(sigma * 4))  # OpenCV's kernel size for float images: 2·round(4σ) + 1
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = np.empty_like(np.asarray(edited))
    for start in range(0, len(source), batch_size):
        src, new, rec = (
            torch.from_numpy(np.ascontiguousarray(a[start : start + batch_size])).to(device).float()
            for a in (source, edited, reconstruction)
        )
        change = (new - rec).abs().amax(-1, keepdim=True).permute(0, 3, 1, 2)
        pad = "reflect" if radius < min(change.shape[-2:]) else "replicate"  # reflect = OpenCV's default border
        change = F.conv2d(F.pad(change, (radius, radius, 0, 0), mode=pad), kernel.view(1, 1, 1, -1))
        change = F.conv2d(F.pad(change, (0, 0, radius, radius), mode=pad), kernel.view(1, 1, -1, 1))
        keep = (1.0 - change / tolerance).clamp(0.0, 1.0).permute(0, 2, 3, 1)
        out[start : start + batch_size] = (new + keep * (src - rec)).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    return out


def without_occluded(blend: torch.Tensor, occlusion: np.ndarray) -> torch.Tensor:
    """The local blend's region (N, 1, h, w) less what is in front of the face: ``occlusion``
    (N, s, s) float in the crop, area-averaged onto the latent grid, so a token half covered by a
    hand counts half and one under it not at all (what of the edit can be seen, :func:`seen_share`)."""
    h, w = blend.shape[-2:]
    share = np.stack([cv2.resize(np.asarray(m, np.float32), (w, h), interpolation=cv2.INTER_AREA) for m in occlusion])
    return blend * (1.0 - torch.from_numpy(share).to(blend)[:, None])


def seen_share(blend: torch.Tensor | None, occlusion: np.ndarray | None) -> np.ndarray | None:
    """(N,) the share of each frame's edit region (``blend`` (N, 1, h, w); None: the whole crop)
    that ``occlusion`` (N, s, s) leaves seen; None without occlusion masks."""
    if occlusion is None:
        return None
    if blend is None:
        return 1.0 - np.asarray(occlusion, np.float32).reshape(len(occlusion), -1).mean(1)
    total = blend.float().flatten(1).sum(1).cpu().numpy()
    seen = without_occluded(blend, occlusion).float().flatten(1).sum(1).cpu().numpy()
    return np.where(total > 0, seen / np.maximum(total, 1e-8), 1.0)


class EditRegionMixin:
    """The pipeline's edit-region stage (step 4): needs its ``tokenizer``, ``text_encoder``, ``scheduler`` and ε2."""

    @torch.no_grad()
    def edit_region_masks(
        self,
        inverted: InvertedVideo,
        prompt: str,
        reference: str,
        edit_weights: dict[str, float],
        *,
        threshold: float = DEFAULT_BLEND_THRESHOLD,
        temporal_smoothing: float = 0.0,
        batch_size: int = 8,
        progress: Progress | None = None,
        differences: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, 1, h, w) masks of where the edit acts, DiffEdit's way: the edit model's noise
        prediction under ``prompt`` and under ``reference`` differ where the prompt asks for a
        change (the eye band for eyeglasses, the mouth for a smile, the hair for a colour). The
        difference is measured on each frame's own inverted latents at :data:`BLEND_TIMESTEPS`,
        so it needs no noise draws and is the same on every run. ``differences``: those
        (:meth:`prompt_differences`), measured already."""
        if differences is None:
            differences, _ = self.prompt_differences(
                inverted, prompt, reference, edit_weights, batch_size=batch_size, progress=progress
            )
        return local_blend_mask(differences, threshold, temporal_smoothing=temporal_smoothing)

    @torch.no_grad()
    def prompt_differences(
        self,
        inverted: InvertedVideo,
        prompt: str,
        reference: str,
        edit_weights: dict[str, float],
        *,
        batch_size: int = 8,
        progress: Progress | None = None,
        known: torch.Tensor | None = None,
        cache: InversionCache | None = None,
    ) -> tuple[torch.Tensor, int]:
        """(N, 1, h, w) mean |ε(prompt) − ε(reference)| of each frame, summed over the levels of
        :data:`BLEND_TIMESTEPS` (:meth:`edit_region_masks`), and the UNet passes that took.
        ``known``: those of the first frames, measured already (the chunk a window shares with the
        window before). The reference's branch is read from ``cache`` when an edit before measured
        it (:class:`ReferenceNoiseStore`); the two branches are separate passes, so that a branch
        read from the cache is the one an edit without it computes, bit for bit."""
        unet = self._role("edit", edit_weights)
        device, dtype = unet.device, unet.dtype
        prediction = self.scheduler.config.prediction_type
        texts = encode_prompt(self.tokenizer, self.text_encoder, [reference, prompt]).to(device, dtype)
        levels = sorted(
            {
                min(range(len(inverted.timesteps)), key=lambda i: abs(int(inverted.timesteps[i]) - t))
                for t in BLEND_TIMESTEPS
            }
        )
        count, first = len(inverted.clean), 0 if known is None else len(known)
        difference = torch.zeros(count, 1, *inverted.clean.shape[-2:])
        if known is not None:
            difference[:first] = known
        store = ReferenceNoiseStore(
            cache,
            inverted,
            unet,
            reference=reference,
            adapters=edit_weights,
            levels=[int(inverted.timesteps[level]) for level in levels],
            batch_size=batch_size,
            first=first,
        )
        shape = (count - first, *inverted.clean.shape[1:])
        stored = store.load(levels, shape)
        noise = stored or {level: torch.empty(shape) for level in levels}

        def predict(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, alpha: float) -> torch.Tensor:
            output = unet(x, t, encoder_hidden_states=text.expand(len(x), -1, -1)).sample.float()
            return predicted_noise(output, x.float(), alpha, prediction).cpu()

        batches, calls = math.ceil((count - first) / batch_size), 0
        for index, level in enumerate(levels):
            t, alpha = inverted.timesteps[level], inverted.alphas[level][0]
            for start in range(first, count, batch_size):
                if progress:
                    progress("edit region", index * batches + (start - first) // batch_size, len(levels) * batches)
                x = inverted.latents[level][start : min(start + batch_size, count)].to(device, dtype)
                rows = slice(start - first, start - first + len(x))
                if stored is None:
                    noise[level][rows] = predict(x, t, texts[:1], alpha)
                eps_prompt = predict(x, t, texts[1:], alpha)
                calls += 1 if stored is not None else 2
                difference[start : start + len(x)] += (eps_prompt - noise[level][rows]).abs().mean(1, keepdim=True)
        if stored is None and count > first:
            store.save(noise)
        if progress:
            progress("edit region", len(levels) * batches, len(levels) * batches)
        return difference, calls

    @staticmethod
    def over_time(settings: EditSettings) -> float:
        """The temporal smoothing that applies: one token is one place on the face in every frame
        of aligned crops only, and the naive baseline edits each frame on its own."""
        return 0.0 if settings.whole_frame or settings.every_frame else settings.temporal_smoothing

    def find_edit_region(
        self,
        inverted: InvertedVideo,
        settings: EditSettings,
        plan: EditPlan,
        *,
        batch_size: int = 8,
        progress: Progress | None = None,
        known: torch.Tensor | None = None,
        cache: InversionCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The local blend's region (:meth:`edit_region_masks`): the reference is the source prompt,
        or the prompt's subject words when there is none. A hair edit of aligned crops leaves out
        the inner face: a hair colour or style does not move the brows, eyes, nose or mouth.
        Returns the region, the prompt differences it was found in (:meth:`prompt_differences`,
        ``known`` those of the first frames), which the next window of a long clip starts from,
        and the UNet passes they took (the reference's branch read from ``cache`` takes none)."""
        reference = mask_reference_prompt(settings.prompt, settings.source_prompt)
        difference, calls = self.prompt_differences(
            inverted,
            settings.prompt,
            reference,
            plan.edit_weights,
            batch_size=batch_size,
            progress=progress,
            known=known,
            cache=cache,
        )
        blend = self.edit_region_masks(
            inverted,
            settings.prompt,
            reference,
            plan.edit_weights,
            threshold=plan.blend_threshold,
            temporal_smoothing=self.over_time(settings),
            differences=difference,
        )
        if plan.hair and not settings.whole_frame:
            blend = blend * (1 - torch.from_numpy(inner_face_share(blend.shape[-1])))
        return blend, difference, calls

    def window_edit_region(
        self,
        inverted: InvertedVideo,
        settings: EditSettings,
        plan: EditPlan,
        window: EditWindow,
        timer: StageTimer,
        batch_size: int,
        occlusion: np.ndarray | None = None,
        cache: InversionCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, int, np.ndarray | None]:
        """Step 4 for one window: the local blend's region and prompt differences
        (:meth:`find_edit_region`, from the differences of the frames it shares with the window
        before, the reference's branch from ``cache`` when kept there), the UNet passes that
        took (None, None, 0 without the local blend), and how much of each frame's region is seen
        (:func:`seen_share` of ``occlusion``, the window's frames' masks in the crop; None without
        it). The region itself is not scaled down where they cover the face: the frames show the
        face behind (:func:`~ipfacediff.occlusion.face_behind_occluders`), and an edit region cut
        there to the latent grid's cells cut the smile beside a microphone at the mouth with it."""
        if not settings.local_blend:
            return None, None, 0, seen_share(None, None if settings.whole_frame else occlusion)
        with timer("mask"):
            blend, difference, calls = self.find_edit_region(
                inverted,
                settings,
                plan,
                batch_size=batch_size,
                progress=window.progress,
                known=window.known,
                cache=cache,
            )
        seen = None if occlusion is None or settings.whole_frame else seen_share(blend, occlusion)
        return blend, difference, calls, seen
