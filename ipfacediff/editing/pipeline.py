"""The IP-FaceDiff pipeline: the method's steps in order, each a stage of this package.

At every denoising step a few keyframes are edited jointly by ε2 (the edit model) under the
target prompt, their self-attention extended across the keyframes of the batch so they agree
with each other, while ε1 (the identity model) run on the *source* latents supplies decoder
residual features and self-attention queries/keys (plug-and-play injection) that hold the face's
identity and layout. Every other frame receives the keyframes' edit through nearest-neighbour
correspondences found in ε1's features of the source video.

Why the non-keyframes cost no UNet pass: TokenFlow runs the UNet on every frame at every step
and replaces only the self-attention outputs, so it saves little over editing each frame. Here
the thing propagated is the keyframes' *edit of the denoiser output*, Δ = ε_edit − ε_source, and
each frame keeps its own source noise ε_source (recovered from the cached inversion, no UNet
call). A frame without edit (Δ = 0) therefore reconstructs exactly, every frame keeps its own
motion and expression, and the keyframes' edit reaches it at the positions its features match.
The correspondences use the guiding model's decoder features captured once during inversion.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ipfacediff.adapters import AdapterLibrary
from ipfacediff.diffusion import (
    InversionCache,
    InvertedVideo,
    Progress,
    StageTimer,
    chunk_bounds,
    check_scheduler,
    decode_latents,
    default_feature_steps,
    encode_frames,
    encode_prompt,
    frames_digest,
    invert_frames,
    join_inverted,
    logger,
    sampling_timesteps,
)
from ipfacediff.editing.denoise import DEFAULT_KEYFRAME_BATCH, Denoised, KeyframeEditMixin, WindowDenoiser
from ipfacediff.editing.guidance import IdentityGuidanceMixin
from ipfacediff.editing.hidden import HiddenFaceMixin
from ipfacediff.editing.plan import EditPlan, plan_edit
from ipfacediff.editing.region import EditRegionMixin, transfer_detail
from ipfacediff.editing.windows import ClipWindows, EditWindow, release_pages
from ipfacediff.errors import NonFiniteError
from ipfacediff.models import ModelSet, activate_role, is_compiled, module_fingerprint
from ipfacediff.settings import DEFAULT_STEPS, EditSettings

# Frames per VAE call, whatever the UNet's batch: at 512² the decoder's activations per frame are
# several times the UNet's, so at the UNet's batch the decode would set the edit's peak memory.
# Two, not one: a single frame takes other CPU convolution kernels, which round differently.
DEFAULT_VAE_BATCH = 2

STAGES = (
    "encode",
    "invert",
    "mask",
    "identity_features",
    "keyframe_edit",
    "identity_gradient",
    "propagation",
    "decode",
)


@dataclass
@dataclass
class EditResult:
    """Edited frames (N, H, W, 3) uint8, per-stage seconds and what was reused."""

    frames: np.ndarray
    timings: dict[str, float]
    inversion_reused: bool
    keyframes_per_step: list[list[int]]
    unet_calls: dict[str, int]
    edit_adapters: dict[str, float] = field(default_factory=dict)  # the ε2 adapters used, by name
    latents: torch.Tensor | None = None  # the edited latents (N, 4, h, w), before decoding (None: not kept)
    hair: bool = False  # an edit of the hair (asked for, or by a hair adapter): paste with the hair mask
    guidance: float | None = None  # the classifier-free guidance it was edited with
    identity_gradient: float = 0.0  # the identity guidance while sampling it was edited with (0: none)
    inversion_reused_share: float = 0.0  # share of the inversion's steps read from the cache
    windows: int = 1  # windows the clip was edited in (settings.window)
    identity_steps_skipped: int = 0  # keyframe steps identity guidance left out, their gradient not finite


@dataclass
class RunStats:
    """What an edit counts as it runs, owned by :meth:`IPFaceDiffPipeline.__call__`: seconds per
    stage (:class:`~ipfacediff.diffusion.StageTimer`, which the stages time themselves under) and
    UNet passes per kind, added up from what each stage returns."""

    timer: StageTimer
    calls: dict[str, int] = field(default_factory=lambda: {"invert": 0, "mask": 0, "identity": 0, "edit": 0})
    skipped_from: int = 0  # the pipeline's count of unguided keyframe steps when the edit began

    def count(self, calls: dict[str, int]) -> None:
        for kind, number in calls.items():
            self.calls[kind] += number


class IPFaceDiffPipeline(DiffusionPipeline, IdentityGuidanceMixin, EditRegionMixin, KeyframeEditMixin, HiddenFaceMixin):
    """Identity-preserving face video editing (IP-FaceDiff), as a diffusers pipeline.

    ``unet`` is ε2 (the edit model), ``identity_unet`` ε1 (the identity model); they may be the
    same module with LoRA adapters, switched by ``edit_adapter_weights`` (adapter "identity" is ε1).
    """

    model_cpu_offload_seq = "text_encoder->identity_unet->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        identity_unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        edit_adapter_weights: dict[str, float] | None = None,
        model_source: str | None = None,
        model_card: dict | None = None,
        adapter_library: dict | None = None,
    ):
        super().__init__()
        if scheduler is not None:  # a model whose output the DDIM maths cannot read fails here, at loading
            check_scheduler(scheduler)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            identity_unet=identity_unet,
            scheduler=scheduler,
        )
        self.register_to_config(
            edit_adapter_weights=dict(edit_adapter_weights or {}),
            model_source=model_source,
            model_card=dict(model_card) if model_card else None,
            adapter_library=dict(adapter_library) if adapter_library else None,  # AdapterLibrary.to_json()
        )

    @classmethod
    def from_model_set(cls, models: ModelSet) -> "IPFaceDiffPipeline":
        return cls(
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            unet=models.unet,
            identity_unet=models.identity_unet,
            scheduler=DDIMScheduler.from_config(models.scheduler.config),
            edit_adapter_weights=models.edit_adapter_weights,
            model_source=models.source,
            adapter_library=models.library.to_json() if models.library else None,
        )

    @property
    def adapter_library(self) -> AdapterLibrary | None:
        """The model's adapter library (None: it has none), as its config holds it."""
        spec = self.config.get("adapter_library")
        return AdapterLibrary.from_json(spec) if spec else None

    def plan_edit(self, settings: EditSettings) -> EditPlan:
        """The plan of ``settings`` under this model's adapter library (:func:`plan_edit`)."""
        return plan_edit(settings, self.adapter_library, self.config.edit_adapter_weights)

    def _role(self, role: str, edit_weights: dict[str, float] | None = None) -> UNet2DConditionModel:
        unet = self.identity_unet if role == "identity" else self.unet
        activate_role(unet, role, self.config.edit_adapter_weights if edit_weights is None else edit_weights)
        return unet

    @torch.no_grad()
    def invert(
        self,
        frames: np.ndarray,
        *,
        source_prompt: str = "",
        steps: int = DEFAULT_STEPS,
        feature_injection: bool = True,
        cache: InversionCache | None = None,
        batch_size: int = 8,
        progress: Progress | None = None,
        timer: StageTimer | None = None,
        edit_weights: dict[str, float] | None = None,
        frame_indices: Sequence[int] | None = None,
        vae_batch_size: int = DEFAULT_VAE_BATCH,
    ) -> tuple[InvertedVideo, torch.Tensor]:
        """Encode and DDIM-invert the frames with the guiding model (ε1, or ε2 when ablated).

        The frames of one cache chunk (:func:`~ipfacediff.diffusion.chunk_bounds` of
        ``frame_indices``, their numbers in the video, default 0, 1, …) are cached under a key of
        their pixels, the models, steps and prompt, so a second edit of the same clip, or of an
        overlapping time range, neither encodes nor inverts the frames it shares.
        """
        timer = timer or StageTimer(self.unet.device)
        role = "identity" if feature_injection else "edit"
        edit_weights = self.config.edit_adapter_weights if edit_weights is None else edit_weights
        guide = self._role(role, edit_weights)
        levels = len(sampling_timesteps(self.scheduler, steps))  # the DDIM steps the schedule gives
        feature_steps = default_feature_steps(levels)
        parts = dict(
            vae=module_fingerprint(self.vae),
            unet=module_fingerprint(guide),
            role=role,
            adapters=edit_weights if role == "edit" else None,
            steps=steps,
            prompt=source_prompt,
            scheduler=dict(self.scheduler.config),
            features=feature_steps,
            dtype=str(guide.dtype),
            # a compiled UNet rounds otherwise: its inversions are its own (uncompiled keys unchanged)
            **({"compiled": True} if is_compiled(guide) else {}),
        )
        bounds = chunk_bounds(list(range(len(frames))) if frame_indices is None else list(frame_indices))
        with timer("invert"):
            source = encode_prompt(self.tokenizer, self.text_encoder, [source_prompt])

        def pieces() -> Iterator[tuple[int, int, InvertedVideo]]:
            for number, (begin, end) in enumerate(bounds):
                chunk = np.array(frames[begin:end])  # a copy: the frames may be a read-only memory map
                key = InversionCache.key(frames=frames_digest(chunk), **parts)
                with timer("encode"):
                    clean = self.encode_chunk(chunk, key, cache, batch_size=vae_batch_size)
                report = None
                if progress:

                    def report(stage, done, total, offset=number * levels):
                        progress(stage, offset + done, len(bounds) * levels)

                with timer("invert"):
                    yield (
                        begin,
                        end,
                        invert_frames(
                            guide,
                            self.scheduler,
                            clean,
                            source,
                            steps=steps,
                            cache=cache,
                            cache_key=key,
                            batch_size=batch_size,
                            feature_steps=feature_steps,
                            progress=report,
                        ),
                    )

        return join_inverted(pieces(), len(frames)), source

    def encode_chunk(
        self, chunk: np.ndarray, key: str, cache: InversionCache | None, *, batch_size: int = 8
    ) -> torch.Tensor:
        """The chunk's latents, from the cache when it has them."""
        stored = cache.load(key, "clean") if cache is not None else None
        if stored is not None:
            return stored["latents"]
        # Row-major like the cached copy, so a re-edit decodes it bit for bit the same.
        clean = encode_frames(self.vae, chunk, batch_size=batch_size).contiguous()
        if cache is not None:
            cache.save(key, "clean", {"latents": clean}, dtype=self.vae.dtype)
        return clean

    @torch.no_grad()
    def reconstruction(
        self,
        inverted: InvertedVideo,
        cache: InversionCache | None = None,
        *,
        batch_size: int = 8,
        rows: int | None = None,
    ) -> np.ndarray:
        """The decoder's picture of the unedited clip (N, H, W, 3) uint8 (its first ``rows``
        frames), kept with the inversion, one cache chunk at a time."""
        rows = len(inverted.clean) if rows is None else rows
        out = []
        for begin, end, key, _ in inverted.chunks or [(0, len(inverted.clean), inverted.cache_key, 0)]:
            if begin >= rows:
                break
            stored = cache.load(key, "reconstruction") if cache is not None and key else None
            if stored is not None and len(stored["frames"]) == end - begin:
                frames = stored["frames"].numpy()
            else:
                frames = decode_latents(self.vae, inverted.clean[begin:end], batch_size=batch_size)
                if cache is not None and key:
                    cache.save(key, "reconstruction", {"frames": torch.from_numpy(frames)})
            out.append(frames[: rows - begin])
        return np.concatenate(out)

    @staticmethod
    def check_inputs(frames: np.ndarray) -> tuple[np.ndarray, list[int], np.ndarray]:
        """The frames to edit, as (distinct frames, index of each run's first frame, run of each
        input frame). A run of identical frames (a still, or frames repeated by constant-rate
        resampling) is one moment: it is edited once, so repeats come out identical and cost nothing.

        Compared a stretch at a time, and without repeats the frames are returned as they came, so
        that frames kept in a file (a memory map) are not all read into memory."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise ValueError("frames must be a non-empty (N, H, W, 3) uint8 array")
        starts = np.ones(len(frames), dtype=bool)
        for begin in range(1, len(frames), 64):
            end = min(begin + 64, len(frames))
            starts[begin:end] = (frames[begin:end] != frames[begin - 1 : end - 1]).any(axis=(1, 2, 3))
        first_of_run = np.flatnonzero(starts).tolist()
        distinct = frames if starts.all() else frames[first_of_run]
        return distinct, first_of_run, np.cumsum(starts) - 1

    def denoise(
        self,
        inverted: InvertedVideo,
        source_embeds: torch.Tensor,
        settings: EditSettings,
        plan: EditPlan,
        window: EditWindow,
        blend: torch.Tensor | None,
        targets: torch.Tensor | None,
        *,
        keyframe_batch: int,
        timer: StageTimer,
        cache: InversionCache | None = None,
        seen: np.ndarray | None = None,
    ) -> Denoised:
        """Step 6 for one window (:class:`~ipfacediff.editing.denoise.WindowDenoiser`): ``blend`` the
        edit region (None: everywhere), ``targets`` the frames' identities (None: no identity guidance),
        ``cache`` where ε1's features of the keyframes are kept for a re-edit, ``seen`` how much of
        each frame's edit region is in view (None: all of it)."""
        denoiser = WindowDenoiser(
            self,
            inverted,
            source_embeds,
            settings,
            plan,
            window,
            blend=blend,
            targets=targets,
            keyframe_batch=keyframe_batch,
            timer=timer,
            cache=cache,
            seen=seen,
        )
        return denoiser.run()

    def decode(
        self,
        edited: torch.Tensor,
        frames: np.ndarray,
        inverted: InvertedVideo,
        settings: EditSettings,
        cache: InversionCache | None,
        *,
        batch_size: int = 8,
        vae_batch_size: int = DEFAULT_VAE_BATCH,
    ) -> np.ndarray:
        """The edited latents as pictures, with the detail the VAE loses put back where the edit
        changed nothing (:func:`transfer_detail`). Latents that are not finite are refused
        (:class:`NonFiniteError`): decoded, they are a grey or black video."""
        NonFiniteError.check(edited, "denoising (the edited latents)", self.unet.dtype)
        output = decode_latents(self.vae, edited, batch_size=vae_batch_size)
        if settings.detail_transfer:
            reconstruction = self.reconstruction(inverted, cache, batch_size=vae_batch_size, rows=len(edited))
            output = transfer_detail(frames, output, reconstruction, device=self.vae.device, batch_size=batch_size)
        return output

    def invert_window(
        self,
        frames: np.ndarray,
        numbers: list[int],
        settings: EditSettings,
        plan: EditPlan,
        window: EditWindow,
        *,
        cache: InversionCache | None,
        timer: StageTimer,
        batch_size: int,
        vae_batch_size: int = DEFAULT_VAE_BATCH,
    ) -> tuple[InvertedVideo, torch.Tensor]:
        """Step 3 for one window: its frames (numbered ``numbers`` in the video) inverted with the
        guiding model, as the settings and plan say (:meth:`invert`)."""
        return self.invert(
            frames,
            source_prompt=settings.source_prompt,
            steps=settings.steps,
            feature_injection=settings.feature_injection,
            cache=cache,
            batch_size=batch_size,
            progress=window.progress,
            timer=timer,
            edit_weights=plan.edit_weights,
            frame_indices=numbers,
            vae_batch_size=vae_batch_size,
        )

    @torch.no_grad()
    def __call__(
        self,
        frames: np.ndarray,
        settings: EditSettings,
        *,
        plan: EditPlan | None = None,
        cache: InversionCache | None = None,
        progress: Progress | None = None,
        batch_size: int = 8,
        keyframe_batch: int = DEFAULT_KEYFRAME_BATCH,
        frame_indices: Sequence[int] | None = None,
        output: np.ndarray | None = None,
        occlusion: np.ndarray | None = None,
        latents: bool = True,
        vae_batch_size: int = DEFAULT_VAE_BATCH,
    ) -> EditResult:
        """Edit face crops (N, H, W, 3) uint8 aligned to the canonical five points (whole frames
        with ``settings.whole_frame``) so they show ``settings.prompt``.

        ``plan`` overrides the adapter library's choice (:meth:`plan_edit`); ``batch_size`` (UNet
        calls), ``vae_batch_size`` (VAE calls) and ``keyframe_batch`` bound memory and do not change
        the result. ``frame_indices`` are the
        frames' numbers in their video (default 0, 1, …), which the inversion cache's chunks
        follow. A clip of more than ``settings.window`` frames is edited window by window
        (:class:`~ipfacediff.editing.windows.ClipWindows`); with ``output`` (an array shaped as
        ``frames``, e.g. a memory map) the edited frames are written into it window by window.
        ``occlusion`` (N, s, s) float, 1 where something is in front of the face
        (:mod:`ipfacediff.occlusion`) in ``frames``, which show the face behind it
        (:func:`~ipfacediff.occlusion.face_behind_occluders`): a frame whose edit region it mostly
        covers is not a keyframe. ``latents=False``
        leaves :attr:`EditResult.latents` None: the frames do not need them, and kept they are
        the one thing of an edit's memory that grows with the clip.
        """
        stats, mapped = RunStats(StageTimer(self.unet.device, STAGES)), [frames, output]
        stats.skipped_from = self.identity_steps_skipped
        # 1. Check the inputs; runs of identical frames are edited once.
        frames, first_of_run, run_of = self.check_inputs(frames)
        occlusion = None if occlusion is None else np.asarray(occlusion)[first_of_run]
        numbers = list(first_of_run) if frame_indices is None else [int(frame_indices[i]) for i in first_of_run]
        # 2. Plan the edit: adapters, guidance, blend threshold, hair, identity guidance.
        plan, clip, timer = (
            plan or self.plan_edit(settings),
            ClipWindows(numbers, settings, progress, keep_latents=latents),
            stats.timer,
        )
        output = np.empty((len(run_of), *frames.shape[1:]), np.uint8) if output is None else output
        for window in clip:  # one window of a long clip at a time (the whole clip when it is short)
            part, numbered = frames[window.begin : window.end], numbers[window.begin : window.end]
            # 3. Invert every frame with the guiding model (cached per chunk of frames and step).
            inverted, embeds = self.invert_window(
                part,
                numbered,
                settings,
                plan,
                window,
                cache=cache,
                timer=timer,
                batch_size=batch_size,
                vae_batch_size=vae_batch_size,
            )
            stats.count({"invert": inverted.unet_calls})
            # NaN or inf in any step reaches the noisiest one: one check for the window's inversion.
            NonFiniteError.check(inverted.latents[0], "the DDIM inversion", self.identity_unet.dtype)
            # 4. Find the edit region (the local blend).
            covered = None if occlusion is None else occlusion[window.begin : window.end]
            blend, difference, mask_calls, seen = self.window_edit_region(
                inverted, settings, plan, window, timer, batch_size, occlusion=covered, cache=cache
            )
            stats.count({"mask": mask_calls})
            # 5. The source faces' identities, for identity guidance (aligned crops only).
            targets = self.window_identities(
                part, settings, plan, window, timer, batch_size, inverted=inverted, cache=cache
            )
            # 6. Denoise: keyframes edited jointly, their edit propagated, each frame stepped and blended.
            denoised = self.denoise(
                inverted,
                embeds,
                settings,
                plan,
                window,
                blend,
                targets,
                keyframe_batch=keyframe_batch,
                timer=timer,
                cache=cache,
                seen=seen,
            )
            stats.count(denoised.calls)
            final = clip.finish(window, part, denoised.latents, inverted, difference, denoised.keyframes)
            # 7. Decode and restore the detail the VAE loses.
            with timer("decode"):
                decoded = self.decode(
                    final,
                    part[: len(final)],
                    inverted,
                    settings,
                    cache,
                    batch_size=batch_size,
                    vae_batch_size=vae_batch_size,
                )
                rows = np.flatnonzero((run_of >= window.begin) & (run_of < window.begin + len(final)))
                output[rows] = decoded[run_of[rows] - window.begin]  # repeats included
            for array in mapped:
                release_pages(array)
            del denoised, inverted
        return self.result(output, clip, stats, settings, plan, first_of_run, run_of)

    def result(
        self,
        output: np.ndarray,
        clip: ClipWindows,
        stats: RunStats,
        settings: EditSettings,
        plan: EditPlan,
        first_of_run: list[int],
        run_of: np.ndarray,
    ) -> EditResult:
        """The :class:`EditResult` of an edit: its frames, what it counted, and what it was edited with."""
        levels = len(sampling_timesteps(self.scheduler, settings.steps))
        edited, clip.latents = clip.latents, None
        skipped = self.identity_steps_skipped - stats.skipped_from
        if skipped:
            logger.warning(
                f"note: identity guidance left {skipped} keyframe step(s) unguided: their gradient through the "
                f"{str(self.vae.dtype).removeprefix('torch.')} decoder was not finite; --dtype float32 guides them"
            )
        repeats = len(run_of) != len(first_of_run)
        return EditResult(
            frames=output,
            timings=stats.timer.seconds,
            inversion_reused=stats.calls["invert"] == 0,
            keyframes_per_step=[[first_of_run[k] for k in chosen] for chosen in clip.history],
            unet_calls=stats.calls,
            edit_adapters=plan.edit_adapters,
            latents=edited[run_of] if repeats and edited is not None else edited,
            hair=plan.hair,
            guidance=plan.guidance,
            inversion_reused_share=clip.reused / (len(first_of_run) * levels),
            identity_gradient=0.0 if settings.whole_frame else plan.identity_gradient,
            windows=len(clip),
            identity_steps_skipped=skipped,
        )
