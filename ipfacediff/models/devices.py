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


def compile_unets(unets: list[torch.nn.Module], *, backend: str = "inductor") -> None:
    """torch.compile each UNet in place (once: a module given twice, ε1 = ε2, is compiled once),
    its weights channels-last, the layout the compiled convolutions are fastest in.

    In place (``Module.compile``) so the module stays the one the pipeline's attention processors,
    hooks and LoRA adapters are set on, and its state dict keeps its names (the weights'
    fingerprint). The pipeline batches frames in a few sizes (full batches, a remainder, keyframe
    batches, CFG's doubled ones): each new size or attention mode compiles once more, the first
    time it is met, and a size that keeps changing turns symbolic (torch's automatic dynamic
    shapes) rather than compiling without end. The result differs from eager execution in rounding
    only, so it is a setting (``ModelSpec.compile``) and the inversion cache keeps compiled runs
    apart (:func:`is_compiled`)."""
    for unet in {id(u): u for u in unets}.values():
        if is_compiled(unet):
            continue
        unet.to(memory_format=torch.channels_last)
        unet.compile(backend=backend)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` was compiled in place (:func:`compile_unets`)."""
    return getattr(module, "_compiled_call_impl", None) is not None
