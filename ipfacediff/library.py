"""Moved to :mod:`ipfacediff.adapters` (``build`` trains a library, ``edits`` holds the built-in
edits, ``words`` the prompt-word rules); this module keeps the old names importable and warns once.
``LibraryEdit`` is :class:`~ipfacediff.adapters.AdapterEntry`."""

import warnings

from ipfacediff.adapters.build import (  # noqa: F401 - the old names, re-exported
    DEFAULT_CLIP,
    LIBRARY_FILE,
    REPORT_FILE,
    LibraryProgress,
    _copy_identity_net,
    _library,
    build_library,
    finished_adapters,
)
from ipfacediff.adapters.edits import (  # noqa: F401
    ADAPTER_GUIDANCES,
    ADAPTER_IDENTITY_GRADIENTS,
    ADAPTER_WEIGHTS,
    BLEND_THRESHOLDS,
    BUILTIN_EDITS,
    EDIT_TARGETS,
    EDIT_WORDS,
    FACEWORLD_DEFAULTS,
    HAIR_EDITS,
    IDENTITY,
    IDENTITY_NET_DIR,
    SOURCE_PROMPT,
    WORK_DIR,
    builtin_edit,
    custom_edit,
    parse_edits,
    split_edits,
)
from ipfacediff.adapters.record import AdapterEntry
from ipfacediff.adapters.words import HAIR_WORDS, PART_WORDS, VAGUE_WORDS, derive_words, is_hair_edit  # noqa: F401

LibraryEdit = AdapterEntry

warnings.warn(
    "ipfacediff.library moved to ipfacediff.adapters (build_library: ipfacediff.adapters.build)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "BUILTIN_EDITS",
    "LibraryEdit",
    "build_library",
    "builtin_edit",
    "custom_edit",
    "derive_words",
    "finished_adapters",
    "is_hair_edit",
    "parse_edits",
]
