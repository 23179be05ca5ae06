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
from functools import lru_cache
from collections.abc import Iterator, Sequence
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
    StageTimer,
    chunk_bounds,
    check_scheduler,
    ddim_step,
    decode_latents,
    default_feature_steps,
    encode_frames,
    encode_prompt,
    frames_digest,
    invert_frames,
    join_inverted,
    predicted_noise,
    sampling_timesteps,
    select_rows,
)
from ipfacediff.errors import UserError
from ipfacediff.face import inner_face_share
from ipfacediff.identity import IdentityEncoder, IdentityNet
from ipfacediff.settings import (
    DEFAULT_BLEND_THRESHOLD,
    DEFAULT_GUIDANCE,  # noqa: F401 - the plan's default, importable here as before
    DEFAULT_IDENTITY_GRADIENT,
    DEFAULT_KEYFRAME_SPACING,
    DEFAULT_STEPS,
    EditSettings,
)
from ipfacediff.adapters import AdapterLibrary, combine_tuned, edit_adapter_name, parse_lora_spec, pick_edit_adapters
from ipfacediff.models import ModelSet, activate_role, module_fingerprint

DEFAULT_KEYFRAME_BATCH = 8
# Keyframes of the first window of a long clip that every later window's keyframe batches attend
# to, so that all windows draw the same edit.
ANCHOR_KEYFRAMES = 2
# Pixels the edit changed by more than this (0-255, blurred) take none of the source's detail.
DETAIL_TOLERANCE = 24.0
# Timesteps at which that difference is measured (on the inverted latents), averaged.
BLEND_TIMESTEPS = (300, 500, 700)
# How often the region's per-frame level is filtered over time with the temporal smoothing's
# [w, 1 − 2w, w] (w = 0.25: 8 passes ≈ a Gaussian of σ = 2 frames); tuned on blonde hair, the
# largest region (benchmarks/README.md).
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

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
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


def extended_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, group: int
) -> torch.Tensor:
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
                    processors[name] = IPFaceDiffAttnProcessor(
                        name, controller, injectable=name.startswith("up_blocks")
                    )
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


def token_similarity(
    frame_features: torch.Tensor, key_features: torch.Tensor, *, side: int, locality: float = 0.05
) -> torch.Tensor:
    """Cosine similarity of every token of a frame to every keyframe token, less a small
    locality prior that settles ties in flat regions (smooth skin) in favour of nearby tokens,
    as aligned face crops move little. features: (..., L, D), L = side²; returns (..., L, L)."""
    a = F.normalize(frame_features.float(), dim=-1)
    b = F.normalize(key_features.float(), dim=-1)
    similarity = a @ b.transpose(-1, -2)
    if locality:
        similarity = similarity - locality * squared_distances(side, str(similarity.device))
    return similarity


def nearest_neighbour_field(
    frame_features: torch.Tensor, key_features: torch.Tensor, *, side: int, locality: float = 0.05
) -> torch.Tensor:
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


@dataclass(frozen=True)
class EditPlan:
    """What the adapter library decides for one edit, before any model work: the ε2 adapters
    (peft name → weight), the guidance and blend threshold they were tuned with, and whether the
    edit is of the hair, and the identity guidance while sampling. Decided by :func:`plan_edit`, not
    inside the denoising code, so that a caller can inspect it, log it or set it by hand (as
    diffusers leaves ``set_adapters`` to the caller)."""

    edit_weights: dict[str, float]
    guidance: float
    blend_threshold: float
    hair: bool
    identity_gradient: float = DEFAULT_IDENTITY_GRADIENT
    strength: float | None = None  # the share of the schedule regenerated (None: the settings')

    @property
    def edit_adapters(self) -> dict[str, float]:
        """The library adapters by their library names."""
        return {n.removeprefix("edit:"): w for n, w in self.edit_weights.items()}


def plan_edit(
    settings: EditSettings, library: AdapterLibrary | None, loaded_edit_weights: dict[str, float] | None = None
) -> EditPlan:
    """The plan of an edit under an adapter library.

    Adapters given at loading (``--edit-lora``) always apply. Otherwise ``settings.adapters``
    decides: "auto" picks the library's adapters whose words the prompt has and the source prompt
    has not, "none" edits with the base model, or names them ("eyeglasses", "eyeglasses:0.8,smile");
    one picked or named without a weight edits at the library's tuned weight (1 unless tuned).
    Every other tuned value (guidance, blend threshold, hair, ...: the fields of
    :class:`~ipfacediff.adapters.AdapterEntry` with a rule) is the edit's setting when given, else
    its field's rule over the picked adapters (:func:`~ipfacediff.adapters.combine_tuned`).
    """
    library = library or AdapterLibrary(None, ())
    words = library.words()
    if loaded_edit_weights:
        weights = dict(loaded_edit_weights)
    elif settings.adapters == "auto":
        weights = {
            edit_adapter_name(n): library.entry(n).tuned_value("weight")
            for n in pick_edit_adapters(words, settings.prompt, settings.source_prompt)
        }
    elif settings.adapters == "none":
        weights = {}
    else:
        weights = {}
        for spec in filter(None, (part.strip() for part in settings.adapters.split(","))):
            name, weight = parse_lora_spec(spec)
            if name not in words:
                offered = ", ".join(words) if words else "none: this model has no adapter library"
                raise UserError(f"unknown edit adapter {name!r}; this model offers: {offered}")
            weights[edit_adapter_name(name)] = weight if name != spec else library.entry(name).tuned_value("weight")
    entries = [library.entry(n.removeprefix("edit:")) for n in weights]
    return EditPlan(weights, **combine_tuned(entries, settings))


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
    identity_gradient: float = 0.0  # the identity guidance while sampling it was edited with (0: none)
    inversion_reused_share: float = 0.0  # share of the inversion's steps read from the cache
    windows: int = 1  # windows the clip was edited in (settings.window)


@dataclass
class Anchors:
    """The first window's anchor keyframes, which every later window's keyframe batches attend
    to: their crops, their source inversion and their edited latents at every step (a few frames:
    small next to a window)."""

    frames: np.ndarray
    source: InvertedVideo
    edits: dict[int, torch.Tensor]


@dataclass
class EditWindow:
    """One window of a clip edited in several (:func:`edit_windows`): which it is, the keyframes it
    draws per step (None: as the settings say), the edited latents of its appended anchor rows at
    every step, and in the first window the rows made anchors, whose edited latents it records."""

    index: int = 0
    keyframes: int | None = None
    anchor_edits: dict[int, torch.Tensor] = field(default_factory=dict)
    record: list[int] = field(default_factory=list)
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)

    def seed(self, seed: int) -> int:
        """The keyframe draws' seed: the edit's in the first window (a short clip's draws are the
        same as ever), another for each later one."""
        return seed if self.index == 0 else (seed + 1_000_003 * self.index) % 2**63


class IPFaceDiffPipeline(DiffusionPipeline):
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

    def set_identity_net(self, net: IdentityNet | None) -> None:
        """The identity net that identity guidance differentiates (None: the model card's, else
        dlib's). It is not a saved component: it belongs to the faces, not to the model's weights."""
        self._identity_net = net

    def identity_net(self) -> IdentityNet:
        """The net set by :meth:`set_identity_net`, else the one the model's card names (a
        FaceWorld model's own trainers' net: the report's oracle must not be the one optimised),
        else the one its adapter library's ε1 was trained against, else dlib's, for real faces.
        Loaded on first use."""
        net = getattr(self, "_identity_net", None)
        if net is None:
            library = self.adapter_library
            own = str(library.identity_net) if library and library.identity_net else None
            named = (self.config.model_card or {}).get("identity_net") or own
            net = IdentityEncoder.from_pretrained(named)
            self._identity_net = net
        return net.to(self.vae.device)

    @torch.no_grad()
    def source_identities(self, frames: np.ndarray, *, batch_size: int = 8) -> torch.Tensor:
        """(N, D) identity embeddings of the source crops: what identity guidance holds each frame to."""
        net = self.identity_net()
        out = []
        for start in range(0, len(frames), batch_size):
            crops = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])).permute(0, 3, 1, 2)
            out.append(net(crops.to(self.vae.device).float() / 127.5 - 1.0).float().cpu())
        return torch.cat(out)

    def guide_identity(
        self, x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, targets: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``eps`` changed so that each frame's predicted clean latent x̂0 moves up the gradient of
        the identity similarity between its decoded face and ``targets``.

        The gradient is taken through the VAE decoder and the identity net at x̂0 only, not through
        the UNet: one decoder backward per keyframe instead of a UNet backward, and x̂0 is what the
        late steps draw. The move is the gradient's direction at ``scale`` RMS latent units times
        the similarity still missing, so it fades as the face comes back and does not depend on
        the net's gradient magnitude. One frame at a time: the decoder's backward at 512² needs
        several GB per frame. On the CPU on one thread: some of the convolutions' backward passes
        sum in an order that varies between threads, and the same seed must give the same edit.
        """
        net, vae = self.identity_net(), self.vae
        x0 = (x_t.float() - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
        moved = []
        for row in range(len(x0)):
            with torch.enable_grad(), one_cpu_thread(vae.device):
                point = x0[row : row + 1].to(vae.device, vae.dtype).requires_grad_(True)
                image = vae.decode(point / vae.config.scaling_factor).sample.float().clamp(-1, 1)
                similarity = F.cosine_similarity(net(image), targets[row : row + 1].to(image.device), dim=-1).sum()
                (gradient,) = torch.autograd.grad(similarity, point)
            gradient = gradient.float().cpu()[0]
            size = gradient.pow(2).mean().sqrt().clamp_min(1e-12)
            moved.append(x0[row] + scale * max(0.0, 1.0 - similarity.item()) * gradient / size)
        x0 = torch.stack(moved)
        return (x_t.float() - alpha_t**0.5 * x0) / (1 - alpha_t) ** 0.5

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
        identity_guidance: bool = True,
        cache: InversionCache | None = None,
        batch_size: int = 8,
        progress: Progress | None = None,
        timer: StageTimer | None = None,
        edit_weights: dict[str, float] | None = None,
        frame_indices: Sequence[int] | None = None,
        anchors: InvertedVideo | None = None,
    ) -> tuple[InvertedVideo, torch.Tensor]:
        """Encode and DDIM-invert the frames with the guiding model (ε1, or ε2 when ablated).

        The frames of one cache chunk (:func:`~ipfacediff.diffusion.chunk_bounds` of
        ``frame_indices``, their numbers in the video, default 0, 1, …) are cached under a key of
        their pixels, the models, steps and prompt, so a second edit of the same clip, or of an
        overlapping time range, neither encodes nor inverts the frames it shares. ``anchors``
        (another window's anchor keyframes) are appended as rows after the frames.
        """
        timer = timer or StageTimer(self.unet.device)
        role = "identity" if identity_guidance else "edit"
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
        )
        bounds = chunk_bounds(list(range(len(frames))) if frame_indices is None else list(frame_indices))
        with timer("invert"):
            source = encode_prompt(self.tokenizer, self.text_encoder, [source_prompt])

        def pieces() -> Iterator[tuple[int, int, InvertedVideo]]:
            for number, (begin, end) in enumerate(bounds):
                chunk = np.array(frames[begin:end])  # a copy: the frames may be a read-only memory map
                key = InversionCache.key(frames=frames_digest(chunk), **parts)
                with timer("encode"):
                    clean = self.encode_chunk(chunk, key, cache, batch_size=batch_size)
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

        return join_inverted(pieces(), len(frames), anchors), source

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
            cache.save(key, "clean", {"latents": clean})
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
        rows = inverted.count if rows is None else rows
        out = []
        for begin, end, key, _ in inverted.chunks or [(0, inverted.count, inverted.cache_key, 0)]:
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
            differences = self.prompt_differences(
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
    ) -> torch.Tensor:
        """(N, 1, h, w) mean |ε(prompt) − ε(reference)| of each frame, summed over the levels of
        :data:`BLEND_TIMESTEPS` (:meth:`edit_region_masks`). ``known``: those of the first frames,
        measured already (the chunk a window shares with the window before)."""
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
        count, first = inverted.count, 0 if known is None else len(known)
        difference = torch.zeros(count, 1, *inverted.clean.shape[-2:])
        if known is not None:
            difference[:first] = known
        batches = math.ceil((count - first) / batch_size)
        for index, level in enumerate(levels):
            t = inverted.timesteps[level]
            for start in range(first, count, batch_size):
                if progress:
                    progress("edit region", index * batches + (start - first) // batch_size, len(levels) * batches)
                x = inverted.latents[level][start : min(start + batch_size, count)].to(device, dtype)
                n = len(x)
                embeds = torch.cat([texts[:1].expand(n, -1, -1), texts[1:].expand(n, -1, -1)])
                output = unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample.float()
                eps = predicted_noise(output, torch.cat([x, x]).float(), inverted.alphas[level][0], prediction)
                eps_reference, eps_prompt = eps.chunk(2)
                difference[start : start + n] += (eps_prompt - eps_reference).abs().mean(1, keepdim=True).cpu()
        if progress:
            progress("edit region", len(levels) * batches, len(levels) * batches)
        return difference

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local blend's region (:meth:`edit_region_masks`): the reference is the source prompt,
        or the prompt's subject words when there is none. A hair edit of aligned crops leaves out
        the inner face: a hair colour or style does not move the brows, eyes, nose or mouth.
        Returns the region and the prompt differences it was found in (:meth:`prompt_differences`,
        ``known`` those of the first frames), which the next window of a long clip starts from."""
        reference = mask_reference_prompt(settings.prompt, settings.source_prompt)
        difference = self.prompt_differences(
            inverted,
            settings.prompt,
            reference,
            plan.edit_weights,
            batch_size=batch_size,
            progress=progress,
            known=known,
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
        return blend, difference

    def capture_identity_features(
        self,
        inverted: InvertedVideo,
        step: int,
        batch: list[int],
        source_embeds: torch.Tensor,
        role: str,
        plan: EditPlan,
        controller: FeatureController,
    ) -> None:
        """Run the guiding model (ε1) on the keyframes' source latents at this step, keeping its
        residual features and self-attention queries/keys for injection into ε2."""
        device, dtype = self.unet.device, self.unet.dtype
        controller.mode, controller.queries_keys, controller.residual = "capture", {}, None
        guide = self._role(role, plan.edit_weights)
        guide(
            inverted.latents[step][batch].to(device, dtype),
            inverted.timesteps[step],
            encoder_hidden_states=source_embeds.to(device, dtype).expand(len(batch), -1, -1),
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
    ) -> torch.Tensor:
        """ε2's guided noise prediction for a batch of keyframes at level ``alpha_t``, self-attention
        extended across the ``group`` frames of the batch, with ε1's captured features injected."""
        device, dtype = self.unet.device, self.unet.dtype
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

    def denoise(
        self,
        inverted: InvertedVideo,
        source_embeds: torch.Tensor,
        settings: EditSettings,
        plan: EditPlan,
        blend: torch.Tensor | None,
        timer: StageTimer,
        calls: dict[str, int],
        *,
        identity_targets: torch.Tensor | None = None,
        keyframe_batch: int = DEFAULT_KEYFRAME_BATCH,
        progress: Progress | None = None,
        window: EditWindow | None = None,
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """The denoising loop. Each step: choose keyframes, edit them jointly with ε2 under ε1's
        features (in the late steps, guided towards the source faces' identities when
        ``identity_targets`` are given), carry their edit Δ = ε_edit − ε_source to every other frame, take the DDIM step
        with each frame's own source noise plus its Δ, and outside the edit region follow the
        source's own trajectory. Returns the edited latents and the keyframes of every step.

        In a window of a long clip (``window``) the rows after the window's frames are the first
        window's anchor keyframes: they take their recorded edited latents at every step and join
        every keyframe batch, so the window draws the edit the first window drew."""
        count, steps = inverted.count, len(inverted.timesteps)
        window = window or EditWindow()
        anchor_rows = list(range(count, len(inverted.clean)))
        device, dtype = self.unet.device, self.unet.dtype
        texts = encode_prompt(self.tokenizer, self.text_encoder, ["", settings.prompt])
        generator = torch.Generator().manual_seed(window.seed(settings.seed))
        keyframe_count = (
            count
            if settings.every_frame
            else (window.keyframes or settings.keyframes or math.ceil(count / DEFAULT_KEYFRAME_SPACING))
        )
        start = min(steps - 1, steps - round((settings.strength if plan.strength is None else plan.strength) * steps))
        edited = inverted.latents[start].clone()
        over_time = self.over_time(settings)
        role = "identity" if settings.identity_guidance else "edit"
        controller = FeatureController()
        history: list[list[int]] = []
        with feature_hooks([self.unet, self.identity_unet], controller):
            for step in range(start, steps):
                t = inverted.timesteps[step]
                alpha_t, alpha_prev = inverted.alphas[step]
                controller.inject_attention = int(t) > settings.inject_attention_until
                controller.inject_features = int(t) > settings.inject_feature_until
                if anchor_rows:
                    edited[count:] = window.anchor_edits[step]
                if window.record:
                    window.recorded[step] = edited[window.record].clone()
                source_eps = inverted.source_eps(step)
                own_pass = settings.every_frame or int(t) < settings.all_keyframes_below
                chosen = (
                    list(range(count))
                    if own_pass
                    else select_keyframes(
                        count, keyframe_count, generator=generator if settings.random_keyframes else None
                    )
                )
                if window.record:  # the anchors are keyframes at every step
                    chosen = sorted(set(chosen) | set(window.record))
                history.append(chosen)
                deltas: dict[int, torch.Tensor] = {}
                for batch in keyframe_batches(chosen, keyframe_batch, anchored=not settings.every_frame):
                    batch = anchor_rows + batch
                    if controller.inject_attention or controller.inject_features:
                        with timer("identity_features"):
                            self.capture_identity_features(inverted, step, batch, source_embeds, role, plan, controller)
                        calls["identity"] += 1
                    with timer("keyframe_edit"):
                        eps = self.edit_keyframes(
                            edited[batch].to(device, dtype),
                            t,
                            alpha_t,
                            texts,
                            plan.guidance,
                            plan,
                            controller,
                            group=1 if settings.every_frame else len(batch),
                        )
                    calls["edit"] += 1
                    if identity_targets is not None and int(t) <= settings.identity_gradient_from:
                        with timer("identity_gradient"):
                            eps = self.guide_identity(
                                edited[batch], eps, alpha_t, identity_targets[batch], plan.identity_gradient
                            )
                    for row, frame in enumerate(batch):
                        if frame < count:
                            deltas.setdefault(frame, eps[row] - source_eps[frame])
                with timer("propagation"):
                    if len(deltas) == count:
                        delta = torch.stack([deltas[f] for f in range(count)])
                    else:
                        delta = propagate_by_nearest_neighbour(
                            deltas,
                            inverted.features_at(step),
                            count,
                            temperature=settings.propagation_temperature,
                            device=device,
                        )
                    delta = smooth_over_time(delta, over_time)
                    if anchor_rows:  # they take their recorded latents at the next step
                        delta = torch.cat([delta, delta.new_zeros(len(anchor_rows), *delta.shape[1:])])
                    edited = ddim_step(edited, source_eps + delta, alpha_t, alpha_prev)
                    if blend is not None:  # outside the edit's region, the source's own trajectory
                        lower = inverted.latents[step + 1] if step + 1 < len(inverted.latents) else inverted.clean
                        edited = lower + blend * (edited - lower)
                if progress:
                    progress("edit", step - start + 1, steps - start)
        return edited, history

    def decode(
        self,
        edited: torch.Tensor,
        frames: np.ndarray,
        inverted: InvertedVideo,
        settings: EditSettings,
        cache: InversionCache | None,
        *,
        batch_size: int = 8,
    ) -> np.ndarray:
        """The edited latents as pictures, with the detail the VAE loses put back where the edit
        changed nothing (:func:`transfer_detail`)."""
        output = decode_latents(self.vae, edited, batch_size=batch_size)
        if settings.detail_transfer:
            reconstruction = self.reconstruction(inverted, cache, batch_size=batch_size, rows=len(edited))
            output = transfer_detail(frames, output, reconstruction, device=self.vae.device, batch_size=batch_size)
        return output

    def edit_window(
        self,
        frames: np.ndarray,
        numbers: list[int],
        settings: EditSettings,
        plan: EditPlan,
        window: EditWindow,
        anchors: Anchors | None,
        *,
        cache: InversionCache | None,
        timer: StageTimer,
        calls: dict[str, int],
        batch_size: int,
        keyframe_batch: int,
        progress: Progress | None,
        known: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, InvertedVideo, list[list[int]], torch.Tensor | None]:
        """Steps 3-6 of an edit, for one window of the clip (the whole clip when it is short).
        Returns the window's edited latents (its frames only), its inversion, the keyframes of
        every step and the local blend's prompt differences (``known``: those of its first frames,
        from the window before)."""
        # 3. Invert every frame with the guiding model (cached per chunk of frames and step).
        inverted, source_embeds = self.invert(
            frames,
            source_prompt=settings.source_prompt,
            steps=settings.steps,
            identity_guidance=settings.identity_guidance,
            cache=cache,
            batch_size=batch_size,
            progress=progress,
            timer=timer,
            edit_weights=plan.edit_weights,
            frame_indices=numbers,
            anchors=anchors.source if anchors else None,
        )
        calls["invert"] += inverted.unet_calls
        # 4. Find the edit region (the local blend).
        blend = difference = None
        if settings.local_blend:
            with timer("mask"):
                blend, difference = self.find_edit_region(
                    inverted, settings, plan, batch_size=batch_size, progress=progress, known=known
                )
                if anchors is not None:  # the anchors' rows take their recorded latents anyway
                    blend = torch.cat([blend, blend.new_ones(len(anchors.frames), *blend.shape[1:])])
            calls["mask"] += len(BLEND_TIMESTEPS) * math.ceil(
                (len(frames) - len(known if known is not None else ())) / batch_size
            )
        # 5. The source faces' identities, for identity guidance (aligned crops only).
        targets = None
        if plan.identity_gradient > 0 and not settings.whole_frame:
            with timer("identity_gradient"):
                faces = frames if anchors is None else np.concatenate([frames, anchors.frames])
                targets = self.source_identities(faces, batch_size=batch_size)
        # 6. Denoise: keyframes edited jointly, their edit propagated, each frame stepped and blended.
        edited, history = self.denoise(
            inverted,
            source_embeds,
            settings,
            plan,
            blend,
            timer,
            calls,
            identity_targets=targets,
            keyframe_batch=keyframe_batch,
            progress=progress,
            window=window,
        )
        return edited[: inverted.count], inverted, history, difference

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
    ) -> EditResult:
        """Edit face crops (N, H, W, 3) uint8 aligned to the canonical five points (whole frames
        with ``settings.whole_frame``) so they show ``settings.prompt``.

        ``plan`` overrides the adapter library's choice (:meth:`plan_edit`); ``batch_size`` and
        ``keyframe_batch`` bound memory and do not change the result. ``frame_indices`` are the
        frames' numbers in their video (default 0, 1, …): the inversion cache's chunks follow
        them, so an edit of an overlapping time range reuses the frames it shares. A clip of more
        than ``settings.window`` frames is edited window by window (:func:`edit_windows`), so that
        memory holds one window's inversion whatever the clip's length; with ``output`` (an array
        shaped as ``frames``, e.g. a memory map) the edited frames are written into it window by
        window and it is the result's ``frames``.
        """
        timer = StageTimer(self.unet.device, STAGES)
        calls = {"invert": 0, "mask": 0, "identity": 0, "edit": 0}
        mapped = [frames, output]  # memory maps whose pages each window lets go of
        # 1. Check the inputs; runs of identical frames are edited once.
        frames, first_of_run, run_of = self.check_inputs(frames)
        numbers = list(first_of_run) if frame_indices is None else [int(frame_indices[i]) for i in first_of_run]
        # 2. Plan the edit: adapters, guidance, blend threshold, hair, and the DDIM steps the schedule gives.
        plan = plan or self.plan_edit(settings)
        levels = len(sampling_timesteps(self.scheduler, settings.steps))
        windows = edit_windows(chunk_bounds(numbers), settings.window)
        anchors: Anchors | None = None
        pending: torch.Tensor | None = None  # the window before's edit of the overlap, faded out
        known: torch.Tensor | None = None  # the local blend's prompt differences of the overlap
        output = np.empty((len(run_of), *frames.shape[1:]), np.uint8) if output is None else output
        latents, history, reused = [], [], 0
        for number, (begin, end) in enumerate(windows):
            if progress and len(windows) > 1:
                progress("windows", number, len(windows))
            window = self.window_plan(number, windows, settings, len(frames))
            window.anchor_edits = anchors.edits if anchors is not None else {}
            # 3-6. Invert, find the edit region, denoise (one window of a long clip at a time).
            edited, inverted, chosen, difference = self.edit_window(
                frames[begin:end],
                numbers[begin:end],
                settings,
                plan,
                window,
                anchors,
                cache=cache,
                timer=timer,
                calls=calls,
                batch_size=batch_size,
                keyframe_batch=keyframe_batch,
                progress=window_progress(progress, number, len(windows)),
                known=known,
            )
            if window.record:
                anchors = Anchors(
                    frames[begin:end][window.record], select_rows(inverted, window.record), window.recorded
                )
            if pending is not None:
                edited[: len(pending)] = cross_fade(pending, edited[: len(pending)])
            keep = windows[number + 1][0] - begin if number + 1 < len(windows) else end - begin
            pending = edited[keep:].clone() if keep < end - begin else None
            known = difference[keep:].clone() if difference is not None and pending is not None else None
            # 7. Decode and restore the detail the VAE loses.
            with timer("decode"):
                decoded = self.decode(
                    edited[:keep], frames[begin : begin + keep], inverted, settings, cache, batch_size=batch_size
                )
                rows = np.flatnonzero((run_of >= begin) & (run_of < begin + keep))  # repeats included
                output[rows] = decoded[run_of[rows] - begin]
            for array in mapped:
                release_pages(array)
            latents.append(edited[:keep])
            reused += sum(r * (b2 - b1) for b1, b2, _, r in inverted.chunks if number == 0 or b1 > 0)
            for step, keys in enumerate(chosen):
                if step == len(history):
                    history.append([])
                history[step] = sorted(set(history[step]) | {begin + k for k in keys})
            del edited, inverted
        if progress and len(windows) > 1:
            progress("windows", len(windows), len(windows))
        edited = torch.cat(latents)
        return EditResult(
            frames=output,
            timings=timer.seconds,
            inversion_reused=calls["invert"] == 0,
            keyframes_per_step=[[first_of_run[k] for k in chosen] for chosen in history],
            unet_calls=calls,
            edit_adapters=plan.edit_adapters,
            latents=edited[run_of],
            hair=plan.hair,
            guidance=plan.guidance,
            inversion_reused_share=reused / (len(frames) * levels),
            identity_gradient=0.0 if settings.whole_frame else plan.identity_gradient,
            windows=len(windows),
        )

    @staticmethod
    def window_plan(number: int, windows: list[tuple[int, int]], settings: EditSettings, total: int) -> EditWindow:
        """The :class:`EditWindow` of window ``number``: keyframes asked for by count are shared out
        by length, and the first of several windows picks :data:`ANCHOR_KEYFRAMES` anchors."""
        if len(windows) == 1:
            return EditWindow()
        begin, end = windows[number]
        keyframes = max(1, round(settings.keyframes * (end - begin) / total)) if settings.keyframes else None
        record = select_keyframes(end - begin, ANCHOR_KEYFRAMES) if number == 0 and not settings.every_frame else []
        return EditWindow(index=number, keyframes=keyframes, record=record)


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch's CPU work on one thread while open (nothing changes for a GPU device)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def edit_windows(chunks: list[tuple[int, int]], window: int) -> list[tuple[int, int]]:
    """(start, end) positions of the windows a clip is edited in: runs of whole cache chunks
    (:func:`~ipfacediff.diffusion.chunk_bounds`) of at most ``window`` frames, each after the first
    starting with the last chunk of the one before, over which the two windows' edits are
    cross-faded (:func:`cross_fade`). A clip of ``window`` frames or fewer is one window."""
    if chunks[-1][1] - chunks[0][0] <= window:
        return [(chunks[0][0], chunks[-1][1])]
    windows, first = [], 0
    while True:
        last = first
        while last + 1 < len(chunks) and chunks[last + 1][1] - chunks[first][0] <= window:
            last += 1
        windows.append((chunks[first][0], chunks[last][1]))
        if last == len(chunks) - 1:
            return windows
        first = last if last > first else last + 1  # a window of one chunk cannot share it


def cross_fade(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Two windows' edited latents of the frames they share, the first window's giving way to the
    second's frame by frame, so that neither window's edit stops at a hard border."""
    weight = torch.arange(1, len(before) + 1, dtype=before.dtype) / (len(before) + 1)
    return before + weight.view(-1, *[1] * (before.dim() - 1)) * (after - before)


def release_pages(array: object) -> None:
    """Drop a shared memory map's pages (:class:`numpy.memmap`, modes r, r+, w+) from this process:
    the data stays in the file and the page cache, but a long clip's crops, read and written a
    window at a time, no longer count in full against the process's memory (or its container's
    limit). Anything else is left alone; a copy-on-write map (mode c) would lose its changes."""
    import mmap

    shared = getattr(array, "_mmap", None)
    if (
        isinstance(array, np.memmap)
        and array.mode in ("r", "r+", "w+")
        and shared is not None
        and hasattr(shared, "madvise")
    ):
        shared.madvise(mmap.MADV_DONTNEED)


def window_progress(progress: Progress | None, number: int, count: int) -> Progress | None:
    """The progress of one window's stages, named after the window ("edit window 2/5") when the
    clip has several."""
    if progress is None or count == 1:
        return progress
    return lambda stage, done, total: progress(f"{stage} window {number + 1}/{count}", done, total)


def keyframe_batches(keyframes: list[int], size: int, *, anchored: bool) -> list[list[int]]:
    """Split keyframes into batches of at most ``size``; with ``anchored`` every later batch also
    carries the first keyframe, so all batches attend to one shared frame and agree.

    This keeps memory flat in the number of keyframes (and so in the video's length).
    """
    if len(keyframes) <= size or not anchored:
        return [keyframes[i : i + size] for i in range(0, len(keyframes), size)]
    anchor, rest = keyframes[0], keyframes[size:]
    return [keyframes[:size]] + [[anchor] + rest[i : i + size - 1] for i in range(0, len(rest), size - 1)]
