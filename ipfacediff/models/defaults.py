"""The model an edit runs on when none is named: the embedded set. With :mod:`~ipfacediff.models.devices`
(what "auto" device and dtype mean), the one place every front-end resolves its defaults."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ipfacediff.models.devices import pick_device, pick_dtype
from ipfacediff.models.tiny import build_tiny_models

__all__ = ["SHIPPED_MODELS", "default_model_dir", "pick_device", "pick_dtype"]

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
