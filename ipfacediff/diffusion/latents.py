"""The VAE and the text encoder: frames to latents and back, prompts to CLIP hidden states."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import AutoencoderKL

from ipfacediff.errors import NonFiniteError

logger = logging.getLogger("ipfacediff.diffusion")


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
    """Scaled latents -> RGB uint8 frames (N, H, W, 3).

    The decoder can overflow float16 with finite latents going in; its NaN would become arbitrary
    bytes in the video, so that is one error line too.
    """
    out = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start : start + batch_size].to(vae.device, vae.dtype) / vae.config.scaling_factor
        image = vae.decode(chunk).sample.float()
        NonFiniteError.check(image, "the VAE decoder (the edited frames)", vae.dtype)
        image = image.clamp(-1, 1)
        out.append(((image + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


@contextmanager
def decoder_checkpointing(vae: AutoencoderKL) -> Iterator[None]:
    """While open, a backward pass through the VAE recomputes each block's activations instead of
    keeping them (diffusers' gradient checkpointing): the decoder's backward at 512² is the
    largest allocation of an edit that guides identity, and with it that allocation is a block's,
    not the decoder's, for one more decoder forward. The gradient is the same. A VAE that already
    checkpoints (one being trained) is left as it is."""
    if not getattr(vae, "_supports_gradient_checkpointing", False) or vae.is_gradient_checkpointing:
        yield
        return
    vae.enable_gradient_checkpointing()
    try:
        yield
    finally:
        vae.disable_gradient_checkpointing()


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
