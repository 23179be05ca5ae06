"""How an adapter and its weight are written: ``PATH[:WEIGHT]`` (``--edit-lora``, manifests,
``--adapters``), its checked weight, and a library adapter's peft name in the UNet."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ipfacediff.errors import UserError


def edit_adapter_name(name: str) -> str:
    """The peft adapter name of library adapter ``name`` in the UNet."""
    return f"edit:{name}"


LORA_WEIGHT_RANGE = (-10.0, 10.0)  # far past any useful strength; a typo like 80 for 0.8 is caught


def lora_weight(value: object, name: str) -> float:
    """The weight of adapter ``name``, checked: a finite number in :data:`LORA_WEIGHT_RANGE`."""
    low, high = LORA_WEIGHT_RANGE
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UserError(
                f"weight {value!r} of {name} is not a number; give a number from {low:g} to {high:g} "
                f"after the colon, such as {name}:0.8"
            ) from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise UserError(
            f"weight {value!r} of {name} must be a finite number from {low:g} to {high:g}; "
            f"give one after the colon, such as {name}:0.8 (1 is the adapter as trained)"
        )
    return float(value)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` (or ``NAME[:WEIGHT]`` of a library adapter), as ``--edit-lora``,
    manifests and ``--adapters`` write an adapter. A colon followed by a path (``C:/x``) or in the
    name of an existing file is part of the path; any other text after the last colon must be a
    weight (:func:`lora_weight`), so ``x.safetensors:O.8`` is an error, not a missing file."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path or any(c in weight for c in "/\\") or _exists(spec):
        return spec, 1.0
    return path, lora_weight(weight.strip(), path)


def _exists(path: str) -> bool:
    try:
        return os.path.lexists(Path(path).expanduser())
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False
