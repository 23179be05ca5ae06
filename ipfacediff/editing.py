"""The IP-FaceDiff editing core: ε1 features, joint keyframe editing with ε2, propagation.

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

import math
import time
from functools import lru_cache
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextModel, CLIPTokenizer

from ipfacediff.diffusion import (
    InversionCache,
    InvertedVideo,
    Progress,
    ddim_step,
    decode_latents,
    default_feature_steps,
    encode_frames,
    encode_prompt,
    frames_digest,
    invert_frames,
)
from ipfacediff.errors import UserError
from ipfacediff.face import inner_face_share
from ipfacediff.models import (
    ModelSet,
    activate_role,
    edit_adapter_name,
    module_fingerprint,
    parse_lora_spec,
    pick_edit_adapters,
)

# Defaults from plug-and-play / TokenFlow: features injected over the first 80 % of a 1000-step
# schedule, attention over the first 50 %; CFG 7.5; one keyframe every 8 frames.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_INJECT_FEATURE_UNTIL = 200
DEFAULT_INJECT_ATTENTION_UNTIL = 500
DEFAULT_KEYFRAME_SPACING = 8
DEFAULT_KEYFRAME_BATCH = 8
DEFAULT_PROPAGATION_TEMPERATURE = 0.0
DEFAULT_TEMPORAL_SMOOTHING = 0.25
DEFAULT_ALL_KEYFRAMES_BELOW = 0  # off
# Pixels the edit changed by more than this (0-255, blurred) take none of the source's detail.
DETAIL_TOLERANCE = 24.0
# Local blend: latent tokens where the edit model's prediction under the prompt differs from that
# under the reference by less than this share of the frame's range follow the source trajectory.
DEFAULT_BLEND_THRESHOLD = 0.5
# Timesteps at which that difference is measured (on the inverted latents), averaged.
BLEND_TIMESTEPS = (300, 500, 700)
# How often the region's per-frame level is filtered over time with the temporal smoothing's
# [w, 1 − 2w, w] (w = 0.25: 8 passes ≈ a Gaussian of σ = 2 frames). Tuned on 16 held-out people the
# quality report does not use, blonde hair (the largest region): warp error 1.74 unfiltered, 1.61 /
# 1.57 / 1.53 / 1.51 at 1 / 3 / 8 / 16 passes, success and identity unchanged.
MASK_SMOOTHING_PASSES = 8
# Words that name the subject or join words rather than say what changes.
FRAME_WORDS = frozenset(
    "a an the of and or with without in on to into add make turn give wearing has have is are "
    "he she they him her them his their "
    "face faces person people photo picture portrait image man woman boy girl head".split()
)


# ---------------------------------------------------------------------------------------------
# Attention processors and feature hooks


@dataclass
class FeatureController:
    """What the hooked UNet does on its next forward pass; shared by all processors and hooks.

    mode "plain": ordinary attention. "capture": record Q/K of decoder self-attention and the
    injection block's output (ε1 on source latents). "edit": attention extended over groups of
    ``group`` consecutive frames of each half of the CFG batch, with the captured Q/K and residual
    features injected when the flags say so.
    """

    mode: str = "plain"
    group: int = 1
    inject_attention: bool = False
    inject_features: bool = False
    queries_keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    residual: torch.Tensor | None = None


class IPFaceDiffAttnProcessor:
    """Self-attention with capture, Q/K injection and attention extended across frames."""

    def __init__(self, name: str, controller: FeatureController, injectable: bool):
        self.name = name
        self.controller = controller
        self.injectable = injectable

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        c = self.controller
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if c.mode == "capture" and self.injectable:
            c.queries_keys[self.name] = (query, key)
        elif c.mode == "edit" and self.injectable and c.inject_attention and self.name in c.queries_keys:
            source_q, source_k = c.queries_keys[self.name]
            repeats = len(query) // len(source_q)  # the source serves both halves of the CFG batch
            query, key = source_q.repeat(repeats, 1, 1), source_k.repeat(repeats, 1, 1)
        group = c.group if c.mode == "edit" else 1
        out = extended_attention(query, key, value, attn.heads, group)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def mask_reference_prompt(prompt: str, source_prompt: str = "") -> str:
    """What the local blend compares the prompt with: the source prompt, or when there is none,
    the prompt's subject alone (its :data:`FRAME_WORDS`: "a face with eyeglasses" → "a face with")."""
    if source_prompt.strip():
        return source_prompt
    words = "".join(ch if ch.isalnum() else " " for ch in prompt.lower()).split()
    return " ".join(w for w in words if w in FRAME_WORDS)


def local_blend_mask(difference: torch.Tensor, threshold: float, *, temporal_smoothing: float = 0.0,
                     passes: int = MASK_SMOOTHING_PASSES) -> torch.Tensor:
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


def extended_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
                       group: int) -> torch.Tensor:
    """Attention in which each frame's queries see the keys/values of all ``group`` frames.

    (B, L, C) tensors, B a multiple of ``group``; group 1 is plain self-attention.
    """
    batch, length, channels = query.shape
    head_dim = channels // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch // group, group * length, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).reshape(batch, length, channels)


def residual_injection_block(unet: UNet2DConditionModel) -> torch.nn.Module:
    """The decoder block whose output plug-and-play injects (SD: up_blocks[1].resnets[1])."""
    block = unet.up_blocks[min(1, len(unet.up_blocks) - 1)]
    return block.resnets[min(1, len(block.resnets) - 1)]


@contextmanager
def feature_hooks(unets: list[UNet2DConditionModel], controller: FeatureController) -> Iterator[None]:
    """Install our processors and the residual hook on each UNet; restore them on exit."""
    saved, handles = [], []

    def residual_hook(_module, _inputs, output):
        if controller.mode == "capture":
            controller.residual = output
        elif controller.mode == "edit" and controller.inject_features and controller.residual is not None:
            return controller.residual.repeat(len(output) // len(controller.residual), 1, 1, 1)
        return None

    try:
        for unet in {id(u): u for u in unets}.values():
            original = dict(unet.attn_processors)
            saved.append((unet, original))
            processors = {}
            for name, processor in original.items():
                if name.endswith("attn1.processor"):
                    processors[name] = IPFaceDiffAttnProcessor(name, controller, injectable=name.startswith("up_blocks"))
                else:
                    processors[name] = processor
            unet.set_attn_processor(processors)
            handles.append(residual_injection_block(unet).register_forward_hook(residual_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for unet, original in saved:
            unet.set_attn_processor(original)


# ---------------------------------------------------------------------------------------------
# Keyframes and propagation


def select_keyframes(frame_count: int, count: int, *, generator: torch.Generator | None = None) -> list[int]:
    """``count`` evenly spaced keyframes; with a generator the grid gets a random offset.

    TokenFlow draws new keyframes at every step so no frame is only ever a follower; one shared
    random offset keeps the spacing even, so no frame is ever far from a keyframe.
    """
    count = max(1, min(count, frame_count))
    spacing = frame_count / count
    offset = spacing / 2 if generator is None else torch.rand(1, generator=generator).item() * spacing
    return sorted({min(frame_count - 1, int(offset + spacing * i)) for i in range(count)})


def two_nearest(frame: int, keyframes: list[int]) -> list[tuple[int, float]]:
    """The (at most) two keyframes closest in time, with weights falling with temporal distance."""
    nearest = sorted(keyframes, key=lambda k: (abs(k - frame), k))[:2]
    if len(nearest) == 1:
        return [(nearest[0], 1.0)]
    d1, d2 = abs(nearest[0] - frame), abs(nearest[1] - frame)
    return [(nearest[0], d2 / (d1 + d2)), (nearest[1], d1 / (d1 + d2))]


def token_similarity(frame_features: torch.Tensor, key_features: torch.Tensor, *,
                     side: int, locality: float = 0.05) -> torch.Tensor:
    """Cosine similarity of every token of a frame to every keyframe token, less a small
    locality prior that settles ties in flat regions (smooth skin) in favour of nearby tokens,
    as aligned face crops move little. features: (..., L, D), L = side²; returns (..., L, L)."""
    a = F.normalize(frame_features.float(), dim=-1)
    b = F.normalize(key_features.float(), dim=-1)
    similarity = a @ b.transpose(-1, -2)
    if locality:
        similarity = similarity - locality * squared_distances(side, str(similarity.device))
    return similarity


def nearest_neighbour_field(frame_features: torch.Tensor, key_features: torch.Tensor, *,
                            side: int, locality: float = 0.05) -> torch.Tensor:
    """For each token of a frame, the index of its most similar keyframe token: (..., L) int64."""
    return token_similarity(frame_features, key_features, side=side, locality=locality).argmax(-1)


@lru_cache(maxsize=8)
def squared_distances(side: int, device: str) -> torch.Tensor:
    """(L, L) squared distances between token positions of a side x side grid, over side²."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1).float()
    return (torch.cdist(grid, grid).pow(2) / side**2).to(device)


def propagate_by_nearest_neighbour(
    deltas: dict[int, torch.Tensor],
    features: torch.Tensor,
    frame_count: int,
    *,
    temperature: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Every frame's edit from the keyframes' edits ``deltas`` {keyframe: (C, h, w)}.

    features: (N, L, D) source features of all frames. A keyframe keeps its own edit; another
    frame takes, token by token, the edits at its nearest neighbours in its two closest
    keyframes, blended by temporal distance. temperature 0 takes the single nearest token
    (TokenFlow); above 0, a softmax of the similarities over that temperature weighs the
    keyframe's tokens, so a token whose best match is a near tie between neighbours does not
    flip from one to the other between frames (flicker on the coarse latent grid).
    Returns (N, C, h, w) on the CPU.
    """
    keyframes = sorted(deltas)
    channels, height, width = deltas[keyframes[0]].shape
    out = torch.empty(frame_count, channels, height, width)
    for k in keyframes:
        out[k] = deltas[k]
    followers = [f for f in range(frame_count) if f not in deltas]
    if not followers:
        return out
    position = {k: i for i, k in enumerate(keyframes)}
    key_features = features[keyframes].to(device)
    key_deltas = torch.stack([deltas[k] for k in keyframes]).reshape(len(keyframes), channels, -1).to(device)
    tokens = key_features.shape[1]
    chunk = max(1, 2**28 // (tokens * tokens * 4))  # two (chunk, L, L) float32 similarity maps
    for start in range(0, len(followers), chunk):
        batch = followers[start : start + chunk]
        pairs = [two_nearest(f, keyframes) for f in batch]
        first = torch.tensor([position[p[0][0]] for p in pairs], device=device)
        second = torch.tensor([position[p[-1][0]] for p in pairs], device=device)
        weight = torch.tensor([p[1][1] if len(p) == 2 else 0.0 for p in pairs], device=device)
        frame_features = features[batch].to(device)
        gathered = []
        for which in (first, second):
            if temperature > 0:
                similarity = token_similarity(frame_features, key_features[which], side=height)
                gathered.append(key_deltas[which] @ torch.softmax(similarity / temperature, -1).transpose(1, 2))
            else:
                index = nearest_neighbour_field(frame_features, key_features[which], side=height)
                gathered.append(torch.gather(key_deltas[which], 2, index[:, None, :].expand(-1, channels, -1)))
        # Written as a correction so that equal edits (and single keyframes) stay bit-identical.
        blended = gathered[0] + weight[:, None, None] * (gathered[1] - gathered[0])
        out[batch] = blended.reshape(len(batch), channels, height, width).cpu()
    return out


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class EditResult:
    """Edited frames (N, H, W, 3) uint8, per-stage seconds and what was reused."""

    frames: np.ndarray
    timings: dict[str, float]
    inversion_reused: bool
    keyframes_per_step: list[list[int]]
    unet_calls: dict[str, int]
    edit_adapters: dict[str, float] = field(default_factory=dict)  # the ε2 adapters used, by name
    latents: torch.Tensor | None = None  # the edited latents (N, 4, h, w), before decoding
    hair: bool = False  # an edit of the hair (asked for, or by a hair adapter): paste with the hair mask
    guidance: float | None = None  # the classifier-free guidance it was edited with


class IPFaceDiffPipeline(DiffusionPipeline):
    """Identity-preserving face video editing (IP-FaceDiff), as a diffusers pipeline.

    ``unet`` is ε2 (the edit model), ``identity_unet`` ε1 (the identity model); they may be the
    same module with LoRA adapters, switched by ``edit_adapter_weights`` (adapter "identity" is ε1).
    """

    model_cpu_offload_seq = "text_encoder->identity_unet->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, identity_unet: UNet2DConditionModel, scheduler: DDIMScheduler,
                 edit_adapter_weights: dict[str, float] | None = None, model_source: str | None = None,
                 adapter_words: dict[str, list[str]] | None = None, hair_adapters: list[str] | None = None,
                 adapter_blend_thresholds: dict[str, float] | None = None,
                 adapter_weights: dict[str, float] | None = None,
                 adapter_guidances: dict[str, float] | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              identity_unet=identity_unet, scheduler=scheduler)
        self.register_to_config(edit_adapter_weights=dict(edit_adapter_weights or {}), model_source=model_source,
                                adapter_words=dict(adapter_words or {}), hair_adapters=list(hair_adapters or []),
                                adapter_blend_thresholds=dict(adapter_blend_thresholds or {}),
                                adapter_weights=dict(adapter_weights or {}),
                                adapter_guidances=dict(adapter_guidances or {}))

    @classmethod
    def from_model_set(cls, models: ModelSet) -> "IPFaceDiffPipeline":
        return cls(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                   unet=models.unet, identity_unet=models.identity_unet,
                   scheduler=DDIMScheduler.from_config(models.scheduler.config),
                   edit_adapter_weights=models.edit_adapter_weights, model_source=models.source,
                   adapter_words=models.library.words() if models.library else None,
                   hair_adapters=[e.name for e in models.library.edits if e.hair] if models.library else None,
                   adapter_blend_thresholds=models.library.blend_thresholds() if models.library else None,
                   adapter_weights=models.library.weights() if models.library else None,
                   adapter_guidances=models.library.guidances() if models.library else None)

    def edit_weights(self, prompt: str, source_prompt: str = "", adapters: str = "auto") -> dict[str, float]:
        """The ε2 adapters (peft name → weight) an edit runs with.

        Adapters given at loading (``--edit-lora``) always apply. Otherwise the model's adapter
        library decides: ``adapters`` "auto" picks by the prompt's words, "none" edits with the
        base model, or names them: "eyeglasses", "eyeglasses:0.8,smile". An adapter picked or
        named without a weight edits at the library's tuned weight for it (1 unless tuned).
        """
        if self.config.edit_adapter_weights:
            return dict(self.config.edit_adapter_weights)
        known, tuned = self.config.adapter_words, self.config.adapter_weights
        if adapters == "auto":
            return {edit_adapter_name(n): tuned.get(n, 1.0) for n in pick_edit_adapters(known, prompt, source_prompt)}
        if adapters == "none":
            return {}
        chosen = {}
        for spec in filter(None, (part.strip() for part in adapters.split(","))):
            name, weight = parse_lora_spec(spec)
            if name not in known:
                offered = ", ".join(known) if known else "none: this model has no adapter library"
                raise UserError(f"unknown edit adapter {name!r}; this model offers: {offered}")
            chosen[edit_adapter_name(name)] = weight if name != spec else tuned.get(name, 1.0)
        return chosen

    def _role(self, role: str, edit_weights: dict[str, float] | None = None) -> UNet2DConditionModel:
        unet = self.identity_unet if role == "identity" else self.unet
        activate_role(unet, role, self.config.edit_adapter_weights if edit_weights is None else edit_weights)
        return unet

    def _sync(self) -> None:
        if self.unet.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def invert(self, frames: np.ndarray, *, source_prompt: str = "", steps: int = DEFAULT_STEPS,
               identity_guidance: bool = True, cache: InversionCache | None = None,
               batch_size: int = 8, progress: Progress | None = None,
               timings: dict[str, float] | None = None,
               edit_weights: dict[str, float] | None = None) -> tuple[InvertedVideo, torch.Tensor]:
        """Encode and DDIM-invert the frames with the guiding model (ε1, or ε2 when ablated).

        Both results are cached under a key of the pixels, models, steps and prompt, so a second
        edit of the same clip neither encodes nor runs a UNet.
        """
        timings = timings if timings is not None else {}
        role = "identity" if identity_guidance else "edit"
        edit_weights = self.config.edit_adapter_weights if edit_weights is None else edit_weights
        guide = self._role(role, edit_weights)
        feature_steps = default_feature_steps(steps)
        key = InversionCache.key(
            frames=frames_digest(frames), vae=module_fingerprint(self.vae), unet=module_fingerprint(guide),
            role=role, adapters=edit_weights if role == "edit" else None,
            steps=steps, prompt=source_prompt, scheduler=dict(self.scheduler.config),
            features=feature_steps, dtype=str(guide.dtype),
        )
        tick = time.perf_counter()
        stored = cache.load(key, "clean") if cache is not None else None
        if stored is not None:
            clean = stored["latents"]
        else:
            # Row-major like the cached copy, so a re-edit decodes it bit for bit the same.
            clean = encode_frames(self.vae, frames, batch_size=batch_size).contiguous()
            if cache is not None:
                cache.save(key, "clean", {"latents": clean})
        self._sync()
        timings["encode"] = time.perf_counter() - tick
        tick = time.perf_counter()
        source = encode_prompt(self.tokenizer, self.text_encoder, [source_prompt])
        inverted = invert_frames(guide, self.scheduler, clean, source, steps=steps, cache=cache, cache_key=key,
                                 batch_size=batch_size, feature_steps=feature_steps, progress=progress)
        self._sync()
        timings["invert"] = time.perf_counter() - tick
        return inverted, source

    @torch.no_grad()
    def reconstruction(self, inverted: InvertedVideo, cache: InversionCache | None = None, *,
                       batch_size: int = 8) -> np.ndarray:
        """The decoder's picture of the unedited clip (N, H, W, 3) uint8, kept with the inversion."""
        key = inverted.cache_key
        stored = cache.load(key, "reconstruction") if cache is not None and key else None
        if stored is not None and len(stored["frames"]) == len(inverted.clean):
            return stored["frames"].numpy()
        frames = decode_latents(self.vae, inverted.clean, batch_size=batch_size)
        if cache is not None and key:
            cache.save(key, "reconstruction", {"frames": torch.from_numpy(frames)})
        return frames

    @torch.no_grad()
    def edit_region_masks(self, inverted: InvertedVideo, prompt: str, reference: str, edit_weights: dict[str, float],
                          *, threshold: float = DEFAULT_BLEND_THRESHOLD, temporal_smoothing: float = 0.0,
                          batch_size: int = 8) -> torch.Tensor:
        """(N, 1, h, w) masks of where the edit acts, DiffEdit's way: the edit model's noise
        prediction under ``prompt`` and under ``reference`` differ where the prompt asks for a
        change (the eye band for eyeglasses, the mouth for a smile, the hair for a colour). The
        difference is measured on each frame's own inverted latents at :data:`BLEND_TIMESTEPS`,
        so it needs no noise draws and is the same on every run."""
        unet = self._role("edit", edit_weights)
        device, dtype = unet.device, unet.dtype
        texts = encode_prompt(self.tokenizer, self.text_encoder, [reference, prompt]).to(device, dtype)
        levels = sorted({min(range(len(inverted.timesteps)), key=lambda i: abs(int(inverted.timesteps[i]) - t))
                         for t in BLEND_TIMESTEPS})
        count = len(inverted.clean)
        difference = torch.zeros(count, 1, *inverted.clean.shape[-2:])
        for level in levels:
            t = inverted.timesteps[level]
            for start in range(0, count, batch_size):
                x = inverted.latents[level][start : start + batch_size].to(device, dtype)
                n = len(x)
                embeds = torch.cat([texts[:1].expand(n, -1, -1), texts[1:].expand(n, -1, -1)])
                eps_reference, eps_prompt = unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample.chunk(2)
                difference[start : start + n] += (eps_prompt - eps_reference).float().abs().mean(1, keepdim=True).cpu()
        return local_blend_mask(difference, threshold, temporal_smoothing=temporal_smoothing)

    @torch.no_grad()
    def __call__(
        self,
        frames: np.ndarray,
        prompt: str,
        *,
        source_prompt: str = "",
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        keyframes: int | None = None,
        keyframe_batch: int = DEFAULT_KEYFRAME_BATCH,
        random_keyframes: bool = True,
        propagation_temperature: float = DEFAULT_PROPAGATION_TEMPERATURE,
        temporal_smoothing: float = DEFAULT_TEMPORAL_SMOOTHING,
        all_keyframes_below: int = DEFAULT_ALL_KEYFRAMES_BELOW,
        inject_feature_until: int = DEFAULT_INJECT_FEATURE_UNTIL,
        inject_attention_until: int = DEFAULT_INJECT_ATTENTION_UNTIL,
        strength: float = 1.0,
        seed: int = 0,
        identity_guidance: bool = True,
        every_frame: bool = False,
        adapters: str = "auto",
        local_blend: bool = True,
        blend_threshold: float | None = None,
        detail_transfer: bool = True,
        hair: bool = False,
        aligned: bool = True,
        cache: InversionCache | None = None,
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> EditResult:
        """Edit aligned face crops (N, H, W, 3) uint8 so they show ``prompt``.

        guidance: ε2's classifier-free guidance (None: the highest that the picked adapters of the
        library were tuned with, an adapter without a tuned value counting as
        :data:`DEFAULT_GUIDANCE`, so that none of their attributes is drawn weaker than tuned);
        keyframes: how many (default one per 8 frames); propagation_temperature: how softly the
        keyframes' edits are carried to the other frames (:func:`propagate_by_nearest_neighbour`);
        temporal_smoothing: how much each frame's edit takes from its neighbours' at every step
        (:func:`smooth_over_time`), and how the local blend's region is filtered over time
        (:func:`local_blend_mask`); aligned crops only, and not for ``every_frame``, the naive
        baseline; all_keyframes_below: at steps whose timestep is below it, every frame is a
        keyframe (its own ε2 pass on its own latents, nothing propagated): a follower's edit is
        computed on a keyframe's latents, so its trajectory never corrects itself, and the last,
        detail-setting steps are where that flickers; strength: the fraction of the schedule that
        is re-generated (1.0 = from the fully inverted noise); identity_guidance=False lets ε2
        guide itself (TokenFlow-like); every_frame=True edits each frame on its own (naive);
        adapters: which ε2 adapters of the model's library edit (see :meth:`edit_weights`);
        local_blend: confine the edit to where it acts (:meth:`edit_region_masks`; the reference
        is the source prompt, or the prompt's subject words when there is none): elsewhere the
        latents follow the source's own inversion trajectory, so the face, hair and background
        the prompt does not ask to change stay as they were; blend_threshold: its threshold (None:
        the lowest that the picked adapters of the library were tuned with, else
        :data:`DEFAULT_BLEND_THRESHOLD`);
        detail_transfer: put the detail the VAE loses back where the edit changed nothing
        (:func:`transfer_detail`); hair: the edit is of the hair (also implied by a hair adapter of
        the library): its region leaves out the inner face (:func:`~ipfacediff.face.inner_face_share`),
        and the result says so (``EditResult.hair``) so the crop is pasted back with the hair mask;
        aligned: the frames are face crops aligned to the canonical five points (False: whole
        frames, where the inner face is nowhere in particular and a token is not one place on
        the face from frame to frame, so neither the hair rule nor temporal smoothing applies).
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise ValueError("frames must be a non-empty (N, H, W, 3) uint8 array")
        if not 0 < strength <= 1:
            raise ValueError("strength must be in (0, 1]")
        if not 0 <= temporal_smoothing < 0.5:
            raise ValueError("temporal_smoothing must be in [0, 0.5)")
        # A run of identical frames (a still, or frames repeated by constant-rate resampling) is
        # one moment: edit it once, so repeats come out identical and cost nothing.
        starts = np.ones(len(frames), dtype=bool)
        starts[1:] = (frames[1:] != frames[:-1]).any(axis=(1, 2, 3))
        first_of_run, run_of = np.flatnonzero(starts).tolist(), np.cumsum(starts) - 1
        frames = frames[first_of_run]
        count = len(frames)
        timings = dict.fromkeys(("encode", "invert", "mask", "identity_features", "keyframe_edit", "propagation",
                                 "decode"), 0.0)
        calls = {"invert": 0, "mask": 0, "identity": 0, "edit": 0}
        edit_weights = self.edit_weights(prompt, source_prompt, adapters)
        library_edits = [n.removeprefix("edit:") for n in edit_weights]
        hair_edit = hair or any(n in self.config.hair_adapters for n in library_edits)
        if guidance is None:
            tuned = self.config.adapter_guidances
            guidance = max((tuned.get(n, DEFAULT_GUIDANCE) for n in library_edits), default=DEFAULT_GUIDANCE)
        if blend_threshold is None:
            tuned = self.config.adapter_blend_thresholds
            blend_threshold = min((tuned[n] for n in library_edits if n in tuned), default=DEFAULT_BLEND_THRESHOLD)
        inverted, source_embeds = self.invert(frames, source_prompt=source_prompt, steps=steps,
                                              identity_guidance=identity_guidance, cache=cache,
                                              batch_size=batch_size, progress=progress, timings=timings,
                                              edit_weights=edit_weights)
        calls["invert"] = inverted.unet_calls
        texts = encode_prompt(self.tokenizer, self.text_encoder, ["", prompt])
        uncond, cond = texts[:1], texts[1:]

        generator = torch.Generator().manual_seed(seed)
        keyframe_count = count if every_frame else (keyframes or math.ceil(count / DEFAULT_KEYFRAME_SPACING))
        start = min(steps - 1, steps - round(strength * steps))
        edited = inverted.latents[start].clone()
        history: list[list[int]] = []
        controller = FeatureController()
        blend = None
        # One token is one place on the face in every frame of aligned crops; the naive baseline
        # edits each frame on its own.
        over_time = temporal_smoothing if aligned and not every_frame else 0.0
        if local_blend:
            tick = time.perf_counter()
            blend = self.edit_region_masks(inverted, prompt, mask_reference_prompt(prompt, source_prompt),
                                           edit_weights, threshold=blend_threshold, batch_size=batch_size,
                                           temporal_smoothing=over_time)
            calls["mask"] = len(BLEND_TIMESTEPS) * math.ceil(count / batch_size)
            if hair_edit and aligned:  # hair colour or style does not move the brows, eyes, nose or mouth
                blend = blend * (1 - torch.from_numpy(inner_face_share(blend.shape[-1])))
            timings["mask"] = time.perf_counter() - tick
        guide_role = "identity" if identity_guidance else "edit"
        device, dtype = self.unet.device, self.unet.dtype

        with feature_hooks([self.unet, self.identity_unet], controller):
            for step in range(start, steps):
                t = inverted.timesteps[step]
                alpha_t, alpha_prev = inverted.alphas[step]
                inject_attention = int(t) > inject_attention_until
                inject_features = int(t) > inject_feature_until
                source_eps = inverted.source_eps(step)
                own_pass = every_frame or int(t) < all_keyframes_below
                chosen = list(range(count)) if own_pass else select_keyframes(
                    count, keyframe_count, generator=generator if random_keyframes else None)
                history.append(chosen)
                deltas: dict[int, torch.Tensor] = {}
                for batch in keyframe_batches(chosen, keyframe_batch, anchored=not every_frame):
                    x_edit = edited[batch].to(device, dtype)
                    if inject_attention or inject_features:
                        tick = time.perf_counter()
                        controller.mode, controller.queries_keys, controller.residual = "capture", {}, None
                        guide = self._role(guide_role, edit_weights)
                        guide(inverted.latents[step][batch].to(device, dtype), t,
                              encoder_hidden_states=source_embeds.to(device, dtype).expand(len(batch), -1, -1))
                        calls["identity"] += 1
                        self._sync()
                        timings["identity_features"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    controller.mode = "edit"
                    controller.group = 1 if every_frame else len(batch)
                    controller.inject_attention, controller.inject_features = inject_attention, inject_features
                    editor = self._role("edit", edit_weights)
                    embeds = torch.cat([uncond.expand(len(batch), -1, -1), cond.expand(len(batch), -1, -1)])
                    eps_uncond, eps_cond = editor(torch.cat([x_edit, x_edit]), t,
                                                  encoder_hidden_states=embeds.to(device, dtype)).sample.chunk(2)
                    calls["edit"] += 1
                    eps = (eps_uncond + guidance * (eps_cond - eps_uncond)).float().cpu()
                    for row, frame in enumerate(batch):
                        deltas.setdefault(frame, eps[row] - source_eps[frame])
                    controller.mode = "plain"
                    self._sync()
                    timings["keyframe_edit"] += time.perf_counter() - tick
                tick = time.perf_counter()
                if len(deltas) == count:
                    delta = torch.stack([deltas[f] for f in range(count)])
                else:
                    delta = propagate_by_nearest_neighbour(deltas, inverted.features_at(step), count,
                                                           temperature=propagation_temperature, device=device)
                delta = smooth_over_time(delta, over_time)
                edited = ddim_step(edited, source_eps + delta, alpha_t, alpha_prev)
                if blend is not None:  # outside the edit's region, the source's own trajectory
                    lower = inverted.latents[step + 1] if step + 1 < len(inverted.latents) else inverted.clean
                    edited = lower + blend * (edited - lower)
                timings["propagation"] += time.perf_counter() - tick
                if progress:
                    progress("edit", step - start + 1, steps - start)

        tick = time.perf_counter()
        output = decode_latents(self.vae, edited, batch_size=batch_size)
        if detail_transfer:
            output = transfer_detail(frames, output, self.reconstruction(inverted, cache, batch_size=batch_size),
                                     device=self.vae.device, batch_size=batch_size)
        self._sync()
        timings["decode"] = time.perf_counter() - tick
        history = [[first_of_run[k] for k in chosen] for chosen in history]
        return EditResult(frames=output[run_of], timings=timings, inversion_reused=inverted.unet_calls == 0,
                          keyframes_per_step=history, unet_calls=calls,
                          edit_adapters={n.removeprefix("edit:"): w for n, w in edit_weights.items()},
                          latents=edited[run_of], hair=hair_edit, guidance=guidance)


def smooth_over_time(delta: torch.Tensor, weight: float) -> torch.Tensor:
    """(N, C, h, w) per-frame edits filtered over time with [weight, 1 − 2·weight, weight].

    The crops are aligned, so one token is one place on the face in every frame; the true edit
    moves with the face, so what changes of the edit from one frame to the next beyond that is
    flicker (a keyframe's own edit against its followers' propagated one, keyframes drawn anew
    every step). The ends repeat their frame; with weight 0 or fewer than 3 frames it is the input.
    """
    if weight == 0 or len(delta) < 3:
        return delta
    padded = torch.cat([delta[:1], delta, delta[-1:]])
    return (1 - 2 * weight) * delta + weight * (padded[:-2] + padded[2:])


def transfer_detail(source: np.ndarray, edited: np.ndarray, reconstruction: np.ndarray, *,
                    tolerance: float = DETAIL_TOLERANCE, device: torch.device | str = "cpu",
                    batch_size: int = 8) -> np.ndarray:
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
        src, new, rec = (torch.from_numpy(np.ascontiguousarray(a[start : start + batch_size])).to(device).float()
                         for a in (source, edited, reconstruction))
        change = (new - rec).abs().amax(-1, keepdim=True).permute(0, 3, 1, 2)
        pad = "reflect" if radius < min(change.shape[-2:]) else "replicate"  # reflect = OpenCV's default border
        change = F.conv2d(F.pad(change, (radius, radius, 0, 0), mode=pad), kernel.view(1, 1, 1, -1))
        change = F.conv2d(F.pad(change, (0, 0, radius, radius), mode=pad), kernel.view(1, 1, -1, 1))
        keep = (1.0 - change / tolerance).clamp(0.0, 1.0).permute(0, 2, 3, 1)
        out[start : start + batch_size] = (new + keep * (src - rec)).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    return out


def keyframe_batches(keyframes: list[int], size: int, *, anchored: bool) -> list[list[int]]:
    """Split keyframes into batches of at most ``size``; with ``anchored`` every later batch also
    carries the first keyframe, so all batches attend to one shared frame and agree.

    This keeps memory flat in the number of keyframes (and so in the video's length).
    """
    if len(keyframes) <= size or not anchored:
        return [keyframes[i : i + size] for i in range(0, len(keyframes), size)]
    anchor, rest = keyframes[0], keyframes[size:]
    return [keyframes[:size]] + [[anchor] + rest[i : i + size - 1] for i in range(0, len(rest), size - 1)]
