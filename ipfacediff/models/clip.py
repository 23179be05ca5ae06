"""CLIP: image and text embeddings for the edit model's directional loss and the evaluation's
edit-strength scores, loaded from a folder or a hub id resolved as the model set is."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from ipfacediff.errors import UserError
from ipfacediff.files import FileProblem, read_json, reading, safetensors_header, short_detail

from ipfacediff.models.loading import _is_hub_id, _snapshot, _weight_files, folder_files, hub_offline

# OpenAI CLIP's image normalisation; a model folder's preprocessor_config.json overrides it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The files of a CLIPModel repo besides its weights that loading reads.
CLIP_FILES = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


def clip_hub_files(listing: list[str]) -> list[str]:
    """Of a CLIPModel hub repo's files, those loading reads: config, tokenizer, preprocessor and
    one copy of the weights (model.safetensors, else pytorch_model.bin, which transformers reads
    with torch's weights-only loader: tensors, no code), not the TensorFlow and Flax copies."""
    return folder_files(listing, "", torch.float32, pickled_ok=True) + [n for n in listing if n in CLIP_FILES]


@dataclass
class ClipScorer:
    """A frozen CLIPModel with its tokenizer and the image normalisation, all in torch."""

    model: torch.nn.Module
    tokenizer: CLIPTokenizer
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ClipScorer":
        self.model.to(device=device, dtype=dtype)
        return self

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> CLIP's input: resized (bicubic, antialiased), clamped
        to [0, 1] and normalised. Differentiable; the faces are square, so no crop is needed."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
        mean, std = self.mean.to(x.device).view(1, 3, 1, 1), self.std.to(x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.model.dtype)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 embeddings (B, D) of images in [-1, 1], on the model's device;
        differentiable."""
        device = next(self.model.parameters()).device
        features = self.model.get_image_features(pixel_values=self.pixels(images.to(device)))
        return F.normalize(_pooled(features).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Normalised float32 embeddings (len(texts), D), on the model's device."""
        limit = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        device = next(self.model.parameters()).device
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        return F.normalize(_pooled(features).float(), dim=-1)

    def text_direction(self, source: str, target: str) -> torch.Tensor:
        """Unit vector E_T(target) − E_T(source), (1, D)."""
        source_embedding, target_embedding = self.text_embeddings([source, target])
        return F.normalize((target_embedding - source_embedding)[None], dim=-1)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(source: str, *, local_files_only: bool | None = None) -> ClipScorer:
    """A frozen CLIPModel and its tokenizer from a folder or a hub id (from the local Hugging Face
    cache only whenever the hub is offline), on the CPU. Weights are model.safetensors or, as
    openai's CLIP repos serve them, pytorch_model.bin read weights-only (no code runs)."""
    from transformers import CLIPModel

    if local_files_only is None:
        local_files_only = hub_offline()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"CLIP model folder {source} has no config.json: pass a folder written by "
                "CLIPModel.save_pretrained (with its tokenizer files) or a hub id"
            )
    elif path.exists():
        raise UserError(
            f"CLIP model {source} is a file: pass a CLIPModel folder or a hub id such as openai/clip-vit-base-patch32"
        )
    elif not _is_hub_id(source):
        raise UserError(
            f"CLIP model {source} does not exist: pass a CLIPModel folder or a hub id such as "
            "openai/clip-vit-base-patch32"
        )
    clip_fix = "pass a folder written by CLIPModel.save_pretrained (with its tokenizer files) or a hub id"
    try:
        folder = path if path.is_dir() else Path(_snapshot(source, local_files_only, clip_hub_files))
    except Exception as error:  # hub errors come in many classes; all mean "not available"
        raise UserError(
            f"cannot load the CLIP model {source} ({short_detail(error)}); download it first with `hf download {source}`"
        ) from None
    # Its files read behind reading(): a damaged one is named, not a library's error.
    read_json(folder / "config.json", "CLIP config", clip_fix)
    files = _weight_files(folder, "CLIP model", allow_pickle=True, fix=clip_fix)
    for name in () if files.pickled else files.names:
        safetensors_header(folder / name, "CLIP weight file", clip_fix)
    try:
        # A pytorch_model.bin is read by transformers with torch.load(weights_only=True): tensors, no code.
        model = CLIPModel.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=not files.pickled, dtype=torch.float32
        )  # FaceWorld ships fp16 weights
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # config and weight errors come in many classes; all mean "unusable"
        raise UserError(
            f"cannot load the CLIP model {source} ({short_detail(error)}); it must hold a CLIPModel (config.json, "
            "model.safetensors or pytorch_model.bin) and its tokenizer files"
        ) from None
    mean, std = CLIP_MEAN, CLIP_STD
    config_file = folder / "preprocessor_config.json"
    if os.path.lexists(config_file):
        preprocessor = read_json(config_file, "CLIP preprocessor config", clip_fix)
        with reading(config_file, "CLIP preprocessor config", clip_fix):
            mean, std = preprocessor.get("image_mean", mean), preprocessor.get("image_std", std)
            if (
                not all(
                    len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
                    for v in (mean, std)
                )
                or min(std) <= 0
            ):
                raise FileProblem("has no 3-number image_mean and positive image_std")
    model.eval().requires_grad_(False)
    return ClipScorer(
        model,
        tokenizer,
        int(model.config.vision_config.image_size),
        torch.tensor(mean, dtype=torch.float32),
        torch.tensor(std, dtype=torch.float32),
    )
