"""Moved to :mod:`ipfacediff.adapters` (the record, its file, the word rules); kept so that old
imports work. ``EditAdapter`` is :class:`~ipfacediff.adapters.AdapterEntry`."""

from ipfacediff.adapters.record import ADAPTER_LIBRARY, AdapterEntry, AdapterLibrary
from ipfacediff.adapters.weights import LORA_WEIGHT_RANGE, edit_adapter_name, lora_weight, parse_lora_spec
from ipfacediff.adapters.words import pick_edit_adapters

EditAdapter = AdapterEntry

__all__ = [
    "ADAPTER_LIBRARY",
    "LORA_WEIGHT_RANGE",
    "AdapterEntry",
    "AdapterLibrary",
    "EditAdapter",
    "edit_adapter_name",
    "lora_weight",
    "parse_lora_spec",
    "pick_edit_adapters",
]
