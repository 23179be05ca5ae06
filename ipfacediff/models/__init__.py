"""The model set: an SD-1.x model (VAE, text encoder, tokenizer, ε2 edit UNet, ε1 identity UNet),
its adapter library, the CLIP scorer that training and evaluation share, and tiny stand-ins.

Three independent parts, one module each: :mod:`~ipfacediff.models.loading` (a diffusers folder,
hub id or single file, safetensors only unless pickles are allowed; the adapter library it applies
is :mod:`ipfacediff.adapters`'s), :mod:`~ipfacediff.models.clip`
and :mod:`~ipfacediff.models.tiny` (the real classes at toy size, for tests and the offline demo).
"""

from ipfacediff.adapters import (
    ADAPTER_LIBRARY,
    LORA_WEIGHT_RANGE,
    AdapterEntry,
    AdapterLibrary,
    edit_adapter_name,
    lora_weight,
    parse_lora_spec,
    pick_edit_adapters,
)
from ipfacediff.models.clip import CLIP_MEAN, CLIP_STD, ClipScorer, load_clip
from ipfacediff.models.devices import compile_unets, is_compiled
from ipfacediff.models.loading import (
    IDENTITY_ADAPTER,
    SD1_SCHEDULER_CONFIG,
    ModelSet,
    Role,
    activate_role,
    hub_offline,
    library_versions,
    load_model_set,
    model_resolution,
    module_fingerprint,
)
from ipfacediff.models.tiny import build_tiny_models, byte_symbols, clip_bpe_tokenizer

EditAdapter = AdapterEntry  # the former name of an adapter library's entry

__all__ = [
    "ADAPTER_LIBRARY",
    "CLIP_MEAN",
    "CLIP_STD",
    "IDENTITY_ADAPTER",
    "LORA_WEIGHT_RANGE",
    "SD1_SCHEDULER_CONFIG",
    "AdapterEntry",
    "AdapterLibrary",
    "ClipScorer",
    "EditAdapter",
    "ModelSet",
    "Role",
    "activate_role",
    "build_tiny_models",
    "byte_symbols",
    "clip_bpe_tokenizer",
    "compile_unets",
    "edit_adapter_name",
    "hub_offline",
    "is_compiled",
    "library_versions",
    "load_clip",
    "load_model_set",
    "lora_weight",
    "model_resolution",
    "module_fingerprint",
    "parse_lora_spec",
    "pick_edit_adapters",
]
