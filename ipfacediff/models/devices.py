"""What "auto" means for a device and a dtype: CUDA when a GPU is visible, float16 on it. One
resolver for the front-ends, the loader and FaceWorld's trainers."""

from __future__ import annotations

import torch

from ipfacediff.errors import SettingError


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
