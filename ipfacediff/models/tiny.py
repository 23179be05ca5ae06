"""Tiny models: the real classes at toy size, so tests and the offline demo run the real loader."""

from __future__ import annotations

import gzip
import importlib
import importlib.util
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ipfacediff.errors import UserError

from ipfacediff.models.loading import SD1_SCHEDULER_CONFIG


def clip_bpe_tokenizer() -> CLIPTokenizer:
    """CLIP's real BPE vocabulary (49,408 tokens), read from the file open_clip_torch ships.

    open_clip is not imported (it needs torchvision); only its vocabulary file is read.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "open_clip_torch is not installed: it ships CLIP's BPE vocabulary (pip install --no-deps open_clip_torch)"
        )
    bpe_path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def byte_symbols() -> list[str]:
    """The byte-level alphabet of GPT-2/CLIP BPE, in vocabulary order.

    Printable bytes stand for themselves; the other bytes get characters from 256 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build_tiny_models(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random SD-1.x-layout model set (plus ``clip/``, a tiny CLIPModel) to ``directory``.

    Same classes, same folder layout and same scheduler as SD-1.5 (64x64 images, f=4 latents of
    16x16, self- and cross-attention at two resolutions), small enough for CPU tests.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    directory = Path(directory)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64,
    )
    with torch.no_grad():  # unit-variance latents, as SD's scaling factor gives its real VAE
        probe = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        std = vae.encode(probe).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_bpe_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD1_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)

    clip = CLIPModel(
        CLIPConfig(
            text_config=text_config.to_dict(),
            vision_config=dict(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=32,
            ),
            projection_dim=32,
        )
    )
    clip.save_pretrained(directory / "clip", safe_serialization=True)
    pipe.tokenizer.save_pretrained(directory / "clip")
    return directory
