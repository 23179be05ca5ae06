"""What "auto" and "the default" mean when no model, device or dtype is named: the embedded model
set, CUDA when a GPU is visible, float16 on it. One place, so every front-end (and FaceWorld's
trainers) resolves them the same way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ipfacediff.errors import SettingError
from ipfacediff.models.tiny import build_tiny_models

SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "assets" / "faceworld"


def default_model_dir() -> Path:
    """The embedded default, no download either way: FaceWorld's trained mini models when the
    package ships them, else the tiny random set, built into the cache on first use."""
    if (SHIPPED_MODELS / "model_index.json").is_file():
        return SHIPPED_MODELS
    folder = _default_cache_dir() / "models" / "tiny-seed0"
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        build_tiny_models(staging, seed=0)
        if folder.exists():  # another process got there first
            shutil.rmtree(staging)
        else:
            staging.replace(folder)
    return folder


def _default_cache_dir() -> Path:
    from ipfacediff.diffusion import default_cache_dir  # the inversion cache's root holds the tiny set too

    return default_cache_dir()


def pick_device(device: str = "auto") -> torch.device:
    """``device`` as torch's; "auto" is CUDA when a GPU is visible."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", "{setting} cuda was asked for but no CUDA GPU is visible; use {setting} cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``dtype`` as torch's; "auto" is float16 on CUDA (its speed, SD's usual), float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise SettingError("dtype", f"{{setting}} must be one of auto, {', '.join(table)}; got {dtype}")
    return table[dtype]
