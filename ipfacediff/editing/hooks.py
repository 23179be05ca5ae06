"""ε1's features into ε2: attention processors and a forward hook that capture, inject and extend
self-attention across frames, installed on the UNets and restored on exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

# Largest attention-score matrix (batch × heads × queries × keys) one attention call may build where
# SDPA has no fused kernel and writes it out whole: 2**26 scores are 256 MiB in float32. Above it the
# queries are taken in chunks (memory: benchmarks/README.md, session 16).
ATTENTION_CHUNK_SCORES = 2**26


@dataclass
class FeatureController:
    """What the hooked UNet does on its next forward pass; shared by all processors and hooks.

    mode "plain": ordinary attention. "capture": record Q/K of the injected decoder self-attention
    layers and the injection resnet's output (ε1 on source latents). "edit": attention
    extended over groups of ``group`` consecutive frames of each half of the CFG batch, with the
    captured Q/K and residual features injected when the flags say so. ``merge``: the share of each
    other keyframe's key/value tokens merged in the highest-resolution layers
    (:func:`merge_tokens`); ``chunk_scores``: see :data:`ATTENTION_CHUNK_SCORES`.
    """

    mode: str = "plain"
    group: int = 1
    inject_attention: bool = False
    inject_features: bool = False
    queries_keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    residual: torch.Tensor | None = None
    merge: float = 0.0
    chunk_scores: int = ATTENTION_CHUNK_SCORES


class IPFaceDiffAttnProcessor:
    """Self-attention with capture, Q/K injection and attention extended across frames
    (``mergeable``: a layer where the controller's token merging applies)."""

    def __init__(self, name: str, controller: FeatureController, injectable: bool, mergeable: bool = False):
        self.name = name
        self.controller = controller
        self.injectable = injectable
        self.mergeable = mergeable

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
        merge = c.merge if self.mergeable else 0.0
        out = extended_attention(query, key, value, attn.heads, group, merge=merge, chunk_scores=c.chunk_scores)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def extended_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: int,
    group: int,
    *,
    merge: float = 0.0,
    chunk_scores: int = ATTENTION_CHUNK_SCORES,
) -> torch.Tensor:
    """Attention in which each frame's queries see the keys/values of all ``group`` frames.

    (B, L, C) tensors, B a multiple of ``group``; group 1 is plain self-attention. With ``merge``
    above 0 each frame sees its own tokens whole and the other frames' merged (:func:`merge_tokens`),
    each merged token weighted by how many it stands for (ToMe's proportional attention).
    """
    batch, length, channels = query.shape
    head_dim = channels // heads
    if group > 1 and merge > 0:
        key, value, log_size = keys_with_merged_others(key, value, group, merge)
        bias = log_size.to(query.dtype)[:, None, None, :]  # (B, 1, 1, keys): the same for every head and query

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    else:
        bias = None

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch // group, group * length, heads, head_dim).transpose(1, 2)

    out = chunked_attention(split(query), split(key), split(value), bias, chunk_scores)
    return out.transpose(1, 2).reshape(batch, length, channels)


def chunked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, chunk_scores: int
) -> torch.Tensor:
    """SDPA over (N, heads, L, D) tensors, its queries in chunks of at most ``chunk_scores`` scores
    where it would build the whole score matrix (no fused kernel for these inputs; on CUDA torch
    says which). A query's softmax runs over its own row, so the chunks give the rows the whole
    call gives, to float rounding."""
    n, heads, queries, _ = query.shape
    per_query = n * heads * key.shape[2]
    if per_query * queries <= chunk_scores or fused_attention(query, key, value, bias):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    step = max(1, chunk_scores // per_query)
    return torch.cat(
        [
            F.scaled_dot_product_attention(query[:, :, start : start + step], key, value, attn_mask=bias)
            for start in range(0, queries, step)
        ],
        dim=2,
    )


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether SDPA runs these inputs on a CUDA kernel that never holds the whole score matrix
    (flash or memory-efficient attention), so chunking would only change the rounding."""
    if query.device.type != "cuda":
        return False
    params = torch.backends.cuda.SDPAParams(query, key, value, bias, 0.0, False, False)
    return torch.backends.cuda.can_use_flash_attention(params) or torch.backends.cuda.can_use_efficient_attention(
        params
    )


def merge_tokens(
    key: torch.Tensor, value: torch.Tensor, share: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching on (N, L, C) keys/values: the tokens split alternately in two
    sets, the ``share`` × L tokens of the first most similar (key cosine) to a token of the second
    averaged into it. Returns the merged keys, values and the log of how many tokens each stands for.

    Matching by similarity, not a stride-2 average of neighbours, because what the other keyframes
    give a frame is correspondence: a stride average blurs the edges (eye corners, a glasses rim)
    that a query matches against, while merging similar tokens averages the flat skin, hair and
    background that many tokens repeat. Its cost, one (L/2)² similarity per frame, is below what it
    saves once a frame sees another frame's tokens halved. At most half the tokens merge (ToMe's
    bound: one set into the other)."""
    n, length, channels = key.shape
    count = min(round(share * length), length // 2)
    if count == 0:
        return key, value, key.new_zeros(n, length, dtype=torch.float32)
    metric = F.normalize(key.float(), dim=-1)
    best, target = (metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)).max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :count], order[:, count:]
    into = target.gather(1, merged)
    sizes = torch.ones(n, length // 2, device=key.device).scatter_add_(
        1, into, torch.ones_like(into, dtype=torch.float32)
    )

    def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def combine(x: torch.Tensor) -> torch.Tensor:
        first, second = x[:, ::2], x[:, 1::2]
        total = second.float().scatter_add(1, into[..., None].expand(-1, -1, channels), rows(first, merged).float())
        return torch.cat([rows(first, kept), (total / sizes[..., None]).to(x.dtype)], dim=1)

    log_size = torch.cat([sizes.new_zeros(n, kept.shape[1]), sizes.log()], dim=1)
    return combine(key), combine(value), log_size


def keys_with_merged_others(
    key: torch.Tensor, value: torch.Tensor, group: int, share: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each frame's keys/values for extended attention: its own whole, then the other frames' of
    its group merged (:func:`merge_tokens`). (B, L, C) in; (B, L + (group − 1) M, C) out, M the
    merged count, with the log sizes (B, L + (group − 1) M)."""
    batch, length, channels = key.shape
    merged_key, merged_value, merged_log = merge_tokens(key, value, share)
    others = torch.tensor([[g for g in range(group) if g != f] for f in range(group)], device=key.device)

    def with_others(own: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        grouped = merged.reshape(batch // group, group, *merged.shape[1:])[:, others]  # (G, group, group − 1, M, …)
        return torch.cat([own, grouped.reshape(batch, -1, *merged.shape[2:])], dim=1)

    own_log = merged_log.new_zeros(batch, length)
    return with_others(key, merged_key), with_others(value, merged_value), with_others(own_log, merged_log)


def residual_injection_block(unet: UNet2DConditionModel) -> torch.nn.Module:
    """The decoder resnet whose features plug-and-play injects (SD: up_blocks[1].resnets[1])."""
    block = unet.up_blocks[min(1, len(unet.up_blocks) - 1)]
    return block.resnets[min(1, len(block.resnets) - 1)]


def injected_attention_layers(processor_names: list[str]) -> set[str]:
    """The decoder self-attention layers whose Q/K ε1 gives ε2: all but the decoder's first
    attention block (SD: up_blocks.1.attentions.0), whose coarse layout PnP and TokenFlow leave to
    ε2 so the edit may change shapes there."""
    decoder = [name for name in processor_names if name.startswith("up_blocks") and name.endswith("attn1.processor")]
    if not decoder:
        return set()
    first_block = decoder[0].split(".transformer_blocks.")[0] + "."
    return {name for name in decoder if not name.startswith(first_block)}


def highest_resolution_layers(processor_names: list[str]) -> set[str]:
    """The self-attention layers of the encoder's first and the decoder's last attention block, the
    UNet's largest token count (SD at 512²: 4096 tokens), where attention costs the most and token
    merging saves the most; ToMe for SD merges there only, as the coarser layers hold fewer,
    less redundant tokens."""
    selfs = [name for name in processor_names if name.endswith("attn1.processor")]
    down = [name for name in selfs if name.startswith("down_blocks.")]
    up = [name for name in selfs if name.startswith("up_blocks.")]
    blocks = {names[i].split(".attentions.")[0] + ".attentions." for names, i in ((down, 0), (up, -1)) if names}
    return {name for name in selfs if any(name.startswith(block) for block in blocks)}


@contextmanager
def feature_hooks(unets: list[UNet2DConditionModel], controller: FeatureController) -> Iterator[None]:
    """Install our processors and the residual hook on each UNet; restore them on exit.

    The hook gives ε2 ε1's whole output of the injection resnet, shortcut included. PnP and
    TokenFlow inject only its residual branch (``conv2``'s output) and keep ε2's shortcut; with
    FaceWorld's ε1/ε2 pair that made edits more often succeed but cost identity and steadiness
    over time (benchmarks/README.md, session 15), so ε1's features here hold the face more firmly.
    """
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
            injected = injected_attention_layers(list(original))
            mergeable = highest_resolution_layers(list(original))
            processors = {}
            for name, processor in original.items():
                if name.endswith("attn1.processor"):
                    processors[name] = IPFaceDiffAttnProcessor(
                        name, controller, injectable=name in injected, mergeable=name in mergeable
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
