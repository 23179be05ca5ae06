"""The adapter library: ε1 and the ε2 edits a model brings (``adapters.json``), as one record.

- :mod:`~ipfacediff.adapters.record`: :class:`AdapterEntry` (one ε2 adapter: its file, words,
  target and tuned values, each field with its limits and how several adapters combine) and
  :class:`AdapterLibrary` (the file, read and written in one place);
- :mod:`~ipfacediff.adapters.words`: the prompt-word rules (which adapters a prompt picks, the
  words a custom edit gets);
- :mod:`~ipfacediff.adapters.edits`: the built-in edits (FaceWorld's tuned values, one table), custom
  edits and the ``--edits`` parser;
- :mod:`~ipfacediff.adapters.weights`: how an adapter and its weight are written (``PATH[:WEIGHT]``);
- :mod:`~ipfacediff.adapters.build`: ``ipfacediff train library`` (imported from there: it brings
  the trainers, which read the library's records from this package);
- :mod:`~ipfacediff.adapters.tune`: ``train library --tune``, each edit's values measured on the
  model (imported from there too).
"""

from ipfacediff.adapters.edits import (
    BUILTIN_EDITS,
    FACEWORLD_DEFAULTS,
    builtin_edit,
    custom_edit,
    parse_edits,
    split_edits,
)
from ipfacediff.adapters.record import (
    ADAPTER_LIBRARY,
    AdapterEntry,
    AdapterLibrary,
    Tuned,
    combine_tuned,
    tuned_fields,
)
from ipfacediff.adapters.weights import LORA_WEIGHT_RANGE, edit_adapter_name, lora_weight, parse_lora_spec
from ipfacediff.adapters.words import derive_words, is_hair_edit, pick_edit_adapters, prompt_words

__all__ = [
    "ADAPTER_LIBRARY",
    "BUILTIN_EDITS",
    "FACEWORLD_DEFAULTS",
    "LORA_WEIGHT_RANGE",
    "AdapterEntry",
    "AdapterLibrary",
    "Tuned",
    "builtin_edit",
    "combine_tuned",
    "custom_edit",
    "derive_words",
    "edit_adapter_name",
    "is_hair_edit",
    "lora_weight",
    "parse_edits",
    "parse_lora_spec",
    "pick_edit_adapters",
    "prompt_words",
    "split_edits",
    "tuned_fields",
]
