"""Step 6, one window's denoising loop: at each step keyframes edited jointly by ε2 under ε1's
features, their edit carried to every other frame, and each frame stepped with its own source
noise plus that edit.

The loop runs over a :class:`StepState` (where the step is in the schedule, each frame's source
noise, the step's keyframes and the edits they got), so each part of a step reads what it needs
from one record instead of a dozen arguments. What it counts (ε1's and ε2's passes) it returns
in :class:`Denoised`; the run's statistics are the pipeline's to add up.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from ipfacediff.diffusion import (
    InversionCache,
    InvertedVideo,
    StageTimer,
    ddim_step,
    encode_prompt,
    predicted_noise,
)
from ipfacediff.editing.hooks import FeatureController, feature_hooks
from ipfacediff.editing.plan import EditPlan
from ipfacediff.editing.propagation import (
    nearest_tokens,
    propagate_by_nearest_neighbour,
    select_keyframes,
    smooth_over_time,
)
from ipfacediff.editing.windows import EditWindow, keyframe_batches
from ipfacediff.settings import DEFAULT_KEYFRAME_SPACING, EditSettings

DEFAULT_KEYFRAME_BATCH = 8
# A frame is a keyframe only where at least this share of its edit region is in view (not behind
# a hand, a board: :func:`~ipfacediff.editing.region.seen_share`).
SEEN_KEYFRAME = 0.5

# Bumped whenever what ε1's capture records changes (editing/hooks.py), so that features cached
# by an older capture are not injected by a newer one.
IDENTITY_FEATURES_VERSION = 1

# Bumped whenever what a step's nearest tokens are (editing/propagation.py) changes.
NEAREST_TOKENS_VERSION = 1


@dataclass
class StepState:
    """One DDIM step of a window: its index in the inversion's timesteps, the timestep and the
    levels it goes between, each frame's source noise, its keyframes and their edits
    Δ = ε_edit − ε_source (by frame, filled batch by batch)."""

    index: int
    t: torch.Tensor
    alpha_t: float
    alpha_prev: float
    source_eps: torch.Tensor
    keyframes: list[int]
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Denoised:
    """A window's edited latents (its frames only), the keyframes of every step, and the UNet
    passes it made: ε1's ("identity") and ε2's ("edit")."""

    latents: torch.Tensor
    keyframes: list[list[int]]
    calls: dict[str, int]


class IdentityFeatureStore:
    """ε1's captured features of keyframe batches, kept in the inversion cache beside the window's
    inversion: they depend on the source latents, the step and ε1 only, not on the prompt, so a
    re-edit (a new prompt, the same clip and seed) reads them instead of running ε1 again.

    One cache entry per window (keyed by its inversion's chunks), one file per step and batch,
    named by a digest of the batch's source latents and what the step injects, so a batch with
    other keyframes or anchors is a different file. Only what the step injects is kept: the
    self-attention queries/keys while attention is injected, the residual while features are.
    Without a cache, or for a window whose inversion is not cached, nothing is kept.
    """

    def __init__(self, cache: InversionCache | None, inverted: InvertedVideo, role: str):
        chunks = inverted.chunk_keys()
        self.cache = cache if chunks else None
        self.key = InversionCache.key(identity_features=IDENTITY_FEATURES_VERSION, chunks=chunks, role=role)

    def name(self, index: int, sources: torch.Tensor, controller: FeatureController) -> str:
        digest = hashlib.sha256(str((tuple(sources.shape), str(sources.dtype))).encode())
        digest.update(sources.contiguous().numpy().tobytes())
        flags = f"{int(controller.inject_attention)}{int(controller.inject_features)}"
        return f"features_{index:04d}_{flags}_{digest.hexdigest()[:16]}"

    def load(self, name: str, controller: FeatureController, device: torch.device) -> bool:
        """Put the stored features of ``name`` into ``controller``; False when there are none."""
        stored = self.cache.load(self.key, name) if self.cache is not None else None
        if stored is None:
            return False
        residual = stored.pop("residual", None)
        controller.residual = residual.to(device) if residual is not None else None
        pairs: dict[str, list[torch.Tensor]] = {}
        for tensor_name, tensor in sorted(stored.items()):
            layer, _, part = tensor_name.rpartition("|")
            pairs.setdefault(layer, [None, None])[part == "k"] = tensor.to(device)
        controller.queries_keys = {layer: (q, k) for layer, (q, k) in pairs.items()}
        return True

    def save(self, name: str, controller: FeatureController) -> None:
        if self.cache is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        if controller.inject_attention:
            for layer, (query, key) in controller.queries_keys.items():
                tensors[f"{layer}|q"], tensors[f"{layer}|k"] = query.cpu(), key.cpu()
        if controller.inject_features and controller.residual is not None:
            tensors["residual"] = controller.residual.cpu()
        self.cache.save(self.key, name, tensors)


class NearestTokenStore:
    """Each step's nearest tokens of the followers in their keyframes (:func:`nearest_tokens`),
    kept in the inversion cache beside the window's inversion: they depend on the source's
    features and on the keyframes the seed draws, not on the prompt, so a re-edit reads them
    instead of searching again. One file per step and keyframe set; without a cache, or for a
    window whose inversion is not cached, nothing is kept."""

    def __init__(self, cache: InversionCache | None, inverted: InvertedVideo):
        chunks = inverted.chunk_keys()
        self.cache = cache if chunks else None
        self.key = InversionCache.key(nearest_tokens=NEAREST_TOKENS_VERSION, chunks=chunks)

    def nearest(
        self,
        index: int,
        keyframes: list[int],
        features: torch.Tensor,
        frame_count: int,
        *,
        side: int,
        device: torch.device | str,
    ) -> torch.Tensor:
        """The nearest tokens of step ``index`` (:func:`nearest_tokens`), read or found and kept."""
        drawn = hashlib.sha256(str((frame_count, sorted(keyframes))).encode()).hexdigest()[:16]
        name = f"nearest_{index:04d}_{drawn}"
        stored = self.cache.load(self.key, name) if self.cache is not None else None
        if stored is not None:
            return stored["nearest"].long()
        found = nearest_tokens(keyframes, features, frame_count, side=side, device=device)
        if self.cache is not None:  # token indices: 16 bits hold a 181² latent grid
            small = torch.int16 if features.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
            self.cache.save(self.key, name, {"nearest": found.to(small)})
        return found


class KeyframeEditMixin:
    """The pipeline's two UNet passes of a keyframe batch: ε1 capturing, ε2 editing. ``device`` and
    ``dtype`` are ε2's, given by a caller of many passes (a diffusers model looks them up through
    all its modules at every ask); by default they are read."""

    def capture_identity_features(
        self,
        source_latents: torch.Tensor,
        t: torch.Tensor,
        source_embeds: torch.Tensor,
        role: str,
        plan: EditPlan,
        controller: FeatureController,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Run the guiding model (ε1) on the keyframes' source latents at this step, keeping its
        residual features and self-attention queries/keys for injection into ε2."""
        device, dtype = device or self.unet.device, dtype or self.unet.dtype
        controller.mode, controller.queries_keys, controller.residual = "capture", {}, None
        guide = self._role(role, plan.edit_weights)
        guide(
            source_latents.to(device, dtype),
            t,
            encoder_hidden_states=source_embeds.to(device, dtype).expand(len(source_latents), -1, -1),
        )

    def edit_keyframes(
        self,
        x_edit: torch.Tensor,
        t: torch.Tensor,
        alpha_t: float,
        texts: torch.Tensor,
        guidance: float,
        plan: EditPlan,
        controller: FeatureController,
        *,
        group: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """ε2's guided noise prediction for a batch of keyframes at level ``alpha_t``, self-attention
        extended across the ``group`` frames of the batch, with ε1's captured features injected."""
        device, dtype = device or self.unet.device, dtype or self.unet.dtype
        controller.mode, controller.group = "edit", group
        editor = self._role("edit", plan.edit_weights)
        n = len(x_edit)
        embeds = torch.cat([texts[:1].expand(n, -1, -1), texts[1:].expand(n, -1, -1)])
        eps_uncond, eps_cond = editor(
            torch.cat([x_edit, x_edit]), t, encoder_hidden_states=embeds.to(device, dtype)
        ).sample.chunk(2)
        controller.mode = "plain"
        guided = (eps_uncond + guidance * (eps_cond - eps_uncond)).float().cpu()
        return predicted_noise(guided, x_edit.float().cpu(), alpha_t, self.scheduler.config.prediction_type)


class WindowDenoiser:
    """The denoising loop of one window. Each step: choose keyframes, edit them jointly with ε2
    under ε1's features (in the late steps, guided towards the source faces' identities when
    ``targets`` are given), carry their edit Δ = ε_edit − ε_source to every other frame, take the
    DDIM step with each frame's own source noise plus its Δ, and outside the edit region
    (``blend``) follow the source's own trajectory.

    In a window of a long clip the first window's anchor keyframes join every keyframe batch
    (:class:`~ipfacediff.editing.windows.EditWindow`), so the window draws the edit the first drew.
    """

    def __init__(
        self,
        pipe,
        inverted: InvertedVideo,
        source_embeds: torch.Tensor,
        settings: EditSettings,
        plan: EditPlan,
        window: EditWindow,
        *,
        blend: torch.Tensor | None,
        targets: torch.Tensor | None,
        keyframe_batch: int,
        timer: StageTimer,
        cache: InversionCache | None = None,
        seen: np.ndarray | None = None,
    ):
        self.pipe, self.inverted, self.source_embeds = pipe, inverted, source_embeds
        self.settings, self.plan, self.window = settings, plan, window
        self.blend, self.targets, self.keyframe_batch, self.timer = blend, targets, keyframe_batch, timer
        self.count = len(inverted.clean)
        self.texts = encode_prompt(pipe.tokenizer, pipe.text_encoder, ["", settings.prompt])
        self.generator = torch.Generator().manual_seed(window.seed(settings.seed))
        spaced = window.keyframes or settings.keyframes or math.ceil(self.count / DEFAULT_KEYFRAME_SPACING)
        self.keyframe_count = self.count if settings.every_frame else spaced
        # The frames that may be keyframes: those whose edit region is mostly in view.
        self.candidates = None if seen is None else [f for f in range(self.count) if seen[f] >= SEEN_KEYFRAME]
        self.over_time = pipe.over_time(settings)
        self.role = "identity" if settings.feature_injection else "edit"
        self.controller = FeatureController(merge=settings.attention_merge)
        self.features = IdentityFeatureStore(cache, inverted, self.role)
        self.nearest = NearestTokenStore(cache, inverted)
        self.calls = {"identity": 0, "edit": 0}
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype  # read once: each read walks the UNet

    def run(self) -> Denoised:
        steps = len(self.inverted.timesteps)
        strength = self.settings.strength if self.plan.strength is None else self.plan.strength
        start = min(steps - 1, steps - round(strength * steps))
        edited = self.inverted.latents[start].clone()
        history: list[list[int]] = []
        unets: list[UNet2DConditionModel] = [self.pipe.unet, self.pipe.identity_unet]
        with feature_hooks(unets, self.controller):
            for index in range(start, steps):
                state = self.begin_step(index, edited)
                history.append(state.keyframes)
                for batch in keyframe_batches(
                    state.keyframes, self.keyframe_batch, anchored=not self.settings.every_frame
                ):
                    self.edit_batch(state, edited, batch)
                with self.timer("propagation"):
                    edited = self.step(state, edited)
                if self.window.progress:
                    self.window.progress("edit", index - start + 1, steps - start)
        return Denoised(edited, history, self.calls)

    def begin_step(self, index: int, edited: torch.Tensor) -> StepState:
        """The step's state: its levels, whether ε1's features are injected, its keyframes (every
        frame in the ablation and below ``all_keyframes_below``, else a draw of the generator)."""
        settings, t = self.settings, self.inverted.timesteps[index]
        alpha_t, alpha_prev = self.inverted.alphas[index]
        self.controller.inject_attention = int(t) > settings.inject_attention_until
        self.controller.inject_features = int(t) > settings.inject_feature_until
        self.window.record_step(index, edited)
        source_eps = self.inverted.source_eps(index)
        if settings.every_frame or int(t) < settings.all_keyframes_below:
            chosen = list(range(self.count))
        else:
            generator = self.generator if settings.random_keyframes else None
            chosen = select_keyframes(self.count, self.keyframe_count, generator=generator, candidates=self.candidates)
        return StepState(index, t, alpha_t, alpha_prev, source_eps, self.window.keyframes_at(chosen))

    def edit_batch(self, state: StepState, edited: torch.Tensor, batch: list[int]) -> None:
        """Edit one keyframe batch with ε2 (under ε1's features, guided by identity in the late
        steps) and keep each keyframe's Δ in ``state``."""
        pipe, plan, window, timer = self.pipe, self.plan, self.window, self.timer
        rows = window.batch_rows(state.index, edited[batch])
        if self.controller.inject_attention or self.controller.inject_features:
            with timer("identity_features"):
                sources = window.batch_sources(state.index, self.inverted.latents[state.index][batch])
                name = self.features.name(state.index, sources, self.controller)
                if not self.features.load(name, self.controller, self.device):
                    pipe.capture_identity_features(
                        sources,
                        state.t,
                        self.source_embeds,
                        self.role,
                        plan,
                        self.controller,
                        device=self.device,
                        dtype=self.dtype,
                    )
                    self.calls["identity"] += 1
                    self.features.save(name, self.controller)
        with timer("keyframe_edit"):
            group = 1 if self.settings.every_frame else len(rows)
            eps = pipe.edit_keyframes(
                rows.to(self.device, self.dtype),
                state.t,
                state.alpha_t,
                self.texts,
                plan.guidance,
                plan,
                self.controller,
                group=group,
                device=self.device,
                dtype=self.dtype,
            )
        self.calls["edit"] += 1
        if self.targets is not None and int(state.t) <= self.settings.identity_gradient_from:
            with timer("identity_gradient"):
                targets = window.batch_targets(self.targets[batch])
                eps = pipe.guide_identity(rows, eps, state.alpha_t, targets, plan.identity_gradient)
        for row, frame in enumerate(batch, start=window.anchor_rows):
            state.deltas.setdefault(frame, eps[row] - state.source_eps[frame])

    def step(self, state: StepState, edited: torch.Tensor) -> torch.Tensor:
        """Every frame's Δ (the keyframes' own, propagated to the rest, smoothed over time), the DDIM
        step with each frame's source noise plus it, and outside the edit region the source's own
        trajectory."""
        if len(state.deltas) == self.count:
            delta = torch.stack([state.deltas[f] for f in range(self.count)])
        else:
            features, temperature = self.inverted.features_at(state.index), self.settings.propagation_temperature
            nearest = None
            if temperature == 0:  # TokenFlow's rule: the nearest tokens do not depend on the edit
                side = self.inverted.clean.shape[-2]
                nearest = self.nearest.nearest(
                    state.index, list(state.deltas), features, self.count, side=side, device=self.device
                )
            delta = propagate_by_nearest_neighbour(
                state.deltas, features, self.count, temperature=temperature, device=self.device, nearest=nearest
            )
        delta = smooth_over_time(delta, self.over_time)
        edited = ddim_step(edited, state.source_eps + delta, state.alpha_t, state.alpha_prev)
        if self.blend is not None:  # outside the edit's region, the source's own trajectory
            latents = self.inverted.latents
            lower = latents[state.index + 1] if state.index + 1 < len(latents) else self.inverted.clean
            edited = lower + self.blend * (edited - lower)
        return edited
