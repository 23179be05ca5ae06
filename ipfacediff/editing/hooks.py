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


@dataclass
class FeatureController:
    """What the hooked UNet does on its next forward pass; shared by all processors and hooks.

    mode "plain": ordinary attention. "capture": record Q/K of the injected decoder self-attention
    layers and the injection resnet's output (ε1 on source latents). "edit": attention
    extended over groups of ``group`` consecutive frames of each half of the CFG batch, with the
    captured Q/K and residual features injected when the flags say so.
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
            processors = {}
            for name, processor in original.items():
                if name.endswith("attn1.processor"):
                    processors[name] = IPFaceDiffAttnProcessor(name, controller, injectable=name in injected)
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
