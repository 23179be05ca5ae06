"""The edits a library can be built with: the built-in ones (FaceWorld's four, with the values
they were tuned with there), custom ``NAME="target prompt"`` ones, and the ``--edits`` parser."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from ipfacediff.adapters.record import VALUES_FACEWORLD, AdapterEntry
from ipfacediff.adapters.words import derive_words, is_hair_edit
from ipfacediff.errors import UserError

SOURCE_PROMPT = "a face"
FACEWORLD_DEFAULTS = VALUES_FACEWORLD  # the mark (values_from) of the table's values below
# The domain (a model card's, ipfacediff/domain.py) of the models the table below was tuned on: a
# library built for a model whose card names it starts from the table, any other from neutral values.
TABLE_DOMAIN = "faceworld"
IDENTITY = "identity"
WORK_DIR = "train_data"  # the aligned training faces (and a caller's own files) until the library is complete
IDENTITY_NET_DIR = "identity_net"
_RESERVED = {IDENTITY, WORK_DIR, IDENTITY_NET_DIR, "checkpoints", "cache"}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")

# The built-in edits: FaceWorld's captions (faceworld.adapters.edit_target), the prompt words that ask
# for each, and the values tuned on FaceWorld's models, on held-out people the quality report does
# not use (their measurements: benchmarks/README.md). They are FaceWorld's only: a library for another
# model gets neutral values (the edit's settings' defaults) or measures its own (`train library
# --tune`); adapters.json says which ("values_from"). Why each value on FaceWorld:
# - eyeglasses: the base model already draws eyeglasses, and the adapter at full weight, pushed along
#   CLIP's direction, darkens the lenses and ages the face (weight 0.3); they show on every face with
#   less guidance than the edit command's default, and less push leaves more of the face (5).
# - blonde_hair: a tighter local-blend region keeps more of the face and flickers less (0.6).
# - beard: the identity net sees a beard, so identity guidance's pull back to the input's face undoes
#   it (0); blonde hair and a smile keep their attribute at 1.
# - smile: a smile reshapes the mouth and needs more room than where the prompt changes ε2's
#   prediction most (0.3); like eyeglasses it shows with less guidance (5).
BUILTIN_EDITS: dict[str, AdapterEntry] = {
    entry.name: entry
    for entry in (
        AdapterEntry(
            "eyeglasses",
            target="a face with eyeglasses",
            words=("eyeglasses", "glasses", "spectacles"),
            weight=0.3,
            guidance=5.0,
            identity_gradient=0.3,
        ),
        AdapterEntry(
            "blonde_hair",
            target="a face with blonde hair",
            words=("blonde", "blond"),
            hair=True,
            blend_threshold=0.6,
            identity_gradient=1.0,
        ),
        AdapterEntry("beard", target="a face with a beard", words=("beard", "bearded"), identity_gradient=0.0),
        AdapterEntry(
            "smile",
            target="a smiling face",
            words=("smile", "smiling", "smiles", "smiley"),
            blend_threshold=0.3,
            guidance=5.0,
            identity_gradient=1.0,
        ),
    )
}
# The table's columns, under their former names (FaceWorld's code and tests read them).
EDIT_WORDS = {name: list(e.words) for name, e in BUILTIN_EDITS.items()}
EDIT_TARGETS = {name: e.target for name, e in BUILTIN_EDITS.items()}
HAIR_EDITS = tuple(name for name, e in BUILTIN_EDITS.items() if e.hair)
BLEND_THRESHOLDS = {name: e.blend_threshold for name, e in BUILTIN_EDITS.items() if e.blend_threshold is not None}
ADAPTER_WEIGHTS = {name: e.weight for name, e in BUILTIN_EDITS.items() if e.weight is not None}
ADAPTER_GUIDANCES = {name: e.guidance for name, e in BUILTIN_EDITS.items() if e.guidance is not None}
ADAPTER_IDENTITY_GRADIENTS = {
    name: e.identity_gradient for name, e in BUILTIN_EDITS.items() if e.identity_gradient is not None
}


def builtin_edit(name: str, target: str | None = None) -> AdapterEntry:
    """A built-in edit (eyeglasses, blonde_hair, beard, smile) with FaceWorld's words and tuned
    values; ``target`` replaces its prompt (its words then also take the new prompt's)."""
    edit = BUILTIN_EDITS[name]
    if target is None or target == edit.target:
        return edit
    words = list(edit.words) + [w for w in derive_words(name, target) if w not in edit.words]
    return replace(edit, target=target, words=tuple(words), hair=edit.hair or is_hair_edit("", target))


def custom_edit(name: str, target: str) -> AdapterEntry:
    """``NAME="target prompt"``: words from its name and prompt, ``hair`` when either mentions hair."""
    return AdapterEntry(name, target=target, words=tuple(derive_words(name, target)), hair=is_hair_edit(name, target))


def split_edits(text: str) -> list[str]:
    """``eyeglasses,smile,tattoo="a face with a tattoo, small"``: the items, split at commas outside
    quotes. A shell has usually removed the quotes (``tattoo=a face with a tattoo``), so a piece
    after a custom prompt that is no name (no ``=``, not built in) continues that prompt."""
    items, current, quote = [], "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
            current += char
        elif char in "\"'":
            quote = char
            current += char
        elif char == ",":
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    merged: list[str] = []
    for item in items:
        bare = item.strip()
        if merged and "=" in merged[-1] and "=" not in bare and bare not in BUILTIN_EDITS and not _NAME.match(bare):
            merged[-1] += "," + item
        else:
            merged.append(item)
    return [item.strip() for item in merged if item.strip()]


def parse_edits(specs: str | Iterable[str], source: str = SOURCE_PROMPT) -> list[AdapterEntry]:
    """``--edits`` values (each comma-separated, the option repeatable) as edits; any mistake (an
    unknown name without a prompt, a name that cannot be a folder, a repeated name, an empty or
    source-equal prompt) is one UserError line."""
    items = [item for spec in ([specs] if isinstance(specs, str) else specs) for item in split_edits(spec)]
    if not items:
        raise UserError(
            f'--edits names no edit: give built-in ones ({", ".join(BUILTIN_EDITS)}) and/or NAME="target prompt"'
        )
    edits: list[AdapterEntry] = []
    for item in items:
        name, equals, prompt = item.partition("=")
        name, prompt = name.strip(), prompt.strip()
        if len(prompt) >= 2 and prompt[0] == prompt[-1] and prompt[0] in "\"'":
            prompt = prompt[1:-1].strip()
        if not _NAME.match(name) or name in _RESERVED:
            raise UserError(
                f"--edits: {name!r} cannot name an edit: use lower-case letters, digits, _ and - "
                f'(not {", ".join(sorted(_RESERVED))}), e.g. tattoo="a face with a tattoo"'
            )
        if equals and not prompt:
            raise UserError(f'--edits: {name}= has no target prompt: write {name}="a face with ..."')
        if not equals and name not in BUILTIN_EDITS:
            raise UserError(
                f"--edits: unknown edit {name!r}: the built-in edits are {', '.join(BUILTIN_EDITS)}; "
                f'give another as {name}="a face with ..." (its target prompt)'
            )
        if any(e.name == name for e in edits):
            raise UserError(f"--edits names {name} twice: give each edit once")
        edit = builtin_edit(name, prompt or None) if name in BUILTIN_EDITS else custom_edit(name, prompt)
        if edit.target.strip().lower() == source.strip().lower():
            raise UserError(
                f"--edits: the target prompt of {name} is the source prompt {source!r}: it must describe the edit"
            )
        edits.append(edit)
    return edits
