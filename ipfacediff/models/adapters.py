"""The adapter library: ε1 and the ε2 edits a model brings (``adapters/adapters.json``), how a
prompt picks them, and how an adapter and its weight are written (``PATH[:WEIGHT]``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ipfacediff.errors import UserError
from ipfacediff.files import check_file, read_json


ADAPTER_LIBRARY = Path("adapters") / "adapters.json"


class _Schema(BaseModel):
    """adapters.json as written: exact JSON types (no "0.5" for 0.5, no 1 for true), finite numbers,
    unknown keys ignored (a newer writer's)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


class _EditEntry(_Schema):
    """One entry of ``edits`` (see :class:`AdapterLibrary` for what each key does)."""

    path: str = Field(min_length=1)
    words: list[str]
    target: str = ""
    hair: bool = False
    blend_threshold: float | None = Field(None, ge=0, lt=1)
    weight: float = Field(1.0, ge=0, le=4)
    guidance: float | None = Field(None, ge=0, le=50)
    defaults_from: str | None = None
    identity_gradient: float | None = Field(None, ge=0, le=10)


class _LibraryFile(_Schema):
    """The whole file: paths relative to its folder."""

    identity: str | None = None
    edits: dict[str, _EditEntry] = {}
    identity_net: str | None = None


@dataclass(frozen=True)
class EditAdapter:
    """One ε2 adapter of a model folder's library: the attribute it adds and the prompt words
    that ask for it."""

    name: str
    path: Path
    words: tuple[str, ...]
    target: str = ""  # the caption it was trained towards, for the record
    hair: bool = False  # it changes hair: its edits are pasted back with the hair-extended mask
    blend_threshold: float | None = None  # the local blend's threshold its edits were tuned with
    weight: float = 1.0  # the weight it edits at unless the edit names one (tuned like the threshold)
    guidance: float | None = None  # the classifier-free guidance its edits were tuned with
    # Where the tuned values came from when they were not tuned on this model ("faceworld tuning":
    # FaceWorld's values, a starting point); None: tuned on it, or no tuned values.
    defaults_from: str | None = None
    identity_gradient: float | None = None  # the identity guidance its edits were tuned with


@dataclass(frozen=True)
class AdapterLibrary:
    """``MODEL/adapters/adapters.json``: ε1 and per-attribute ε2 LoRA adapters shipped with a model.

    Fine-tuning happens once per model (ε1) and once per model and attribute (ε2); a model folder
    that carries its adapters edits with them without any flag: ε1 is always on, and the ε2
    adapters an edit uses are picked from its prompt (:meth:`pick`)::

        {"identity": "identity/pytorch_lora_weights.safetensors",
         "edits": {"eyeglasses": {"path": "eyeglasses/pytorch_lora_weights.safetensors",
                                  "words": ["eyeglasses", "glasses"], "target": "a face with eyeglasses"},
                   "blonde_hair": {..., "hair": true}}}

    ``hair``: the adapter changes the hair, so its edits are blended back with the hair mask.
    ``blend_threshold`` (optional): the local blend's threshold its edits were tuned with, used
    unless the edit sets one; an edit of a shape (a smile widens the mouth) needs more room than
    where the prompt changes the prediction most. ``weight`` (optional, default 1): the weight the
    adapter edits at when the edit does not name one; tuned on held-out people, it can be below 1
    (or 0) where the base model already draws the attribute better than the adapter does.
    ``guidance`` (optional): the classifier-free guidance its edits were tuned with, used unless
    the edit sets one; an attribute that the adapter draws readily needs less push, and less
    push leaves more of the face. ``defaults_from`` (optional): where those tuned values came
    from when they were not tuned on this model (``"faceworld tuning"``: FaceWorld's values, written
    by ``ipfacediff train library`` as starting values); kept, not acted on. ``identity_gradient``
    (optional): the identity guidance while sampling its edits were tuned with, used unless the edit
    sets one; an attribute the identity net sees (a beard) is pulled back towards the input's face
    by it, so it takes less. ``identity_net`` (optional, relative to the library): the identity
    net ε1 was trained against (``train library --identity-net``), which identity guidance uses
    unless the model's card names one; without it, dlib's. Other keys are ignored.

    A library may also live outside the model folder (``ipfacediff train library --output LIB``,
    read with ``--adapters-dir LIB``: :meth:`read_dir`); its paths are relative to LIB.
    """

    identity: Path | None
    edits: tuple[EditAdapter, ...]
    identity_net: Path | None = None  # the identity net ε1 was trained against, when not dlib's

    @classmethod
    def read(cls, model_folder: str | Path) -> "AdapterLibrary | None":
        """``MODEL/adapters/adapters.json``, or None when the model folder has none."""
        file = Path(model_folder).expanduser() / ADAPTER_LIBRARY
        if not os.path.lexists(file):
            return None
        return cls._read_file(
            file, "fix it (see AdapterLibrary in ipfacediff/models/adapters.py) or pass --no-adapter-library"
        )

    @classmethod
    def read_dir(cls, folder: str | Path) -> "AdapterLibrary":
        """The library in ``folder`` (``LIB/adapters.json``; the file itself is accepted too), every
        adapter file it names checked to be there: any problem is one UserError line."""
        path = Path(folder).expanduser()
        if path.name == ADAPTER_LIBRARY.name and not path.is_dir():
            path = path.parent
        check_file(
            path, "adapter library folder", "give the folder `ipfacediff train library --output LIB` wrote", folder=True
        )
        file = path / ADAPTER_LIBRARY.name
        if not os.path.lexists(file):
            raise UserError(
                f"adapter library folder {path} has no {ADAPTER_LIBRARY.name}: it is not a library, or "
                "its build did not finish (the same `ipfacediff train library` command with --resume "
                "completes it)"
            )
        library = cls._read_file(
            file,
            "fix it (see AdapterLibrary in ipfacediff/models/adapters.py) or build the library "
            "again with `ipfacediff train library`",
        )
        for name, adapter in [("identity", library.identity), *((e.name, e.path) for e in library.edits)]:
            if adapter is not None:
                check_file(
                    adapter,
                    f"the {name!r} adapter of {file},",
                    "the same `ipfacediff train library` "
                    "command with --resume trains what is missing; or fix its entry",
                )
        return library

    @classmethod
    def _read_file(cls, file: Path, fix: str) -> "AdapterLibrary":
        from pydantic import ValidationError

        spec = read_json(file, "adapter library", fix)
        try:
            valid = _LibraryFile.model_validate(spec)
        except ValidationError as error:
            raise UserError(f"{file} is not a valid adapter library ({_first_problem(error)}); {fix}") from None
        edits = tuple(
            EditAdapter(
                name,
                file.parent / entry.path,
                tuple(w.lower() for w in entry.words),
                entry.target,
                entry.hair,
                entry.blend_threshold,
                entry.weight,
                entry.guidance,
                entry.defaults_from,
                entry.identity_gradient,
            )
            for name, entry in valid.edits.items()
        )
        identity = file.parent / valid.identity if valid.identity else None
        identity_net = file.parent / valid.identity_net if valid.identity_net else None
        return cls(identity, edits, identity_net)

    def words(self) -> dict[str, list[str]]:
        return {e.name: list(e.words) for e in self.edits}

    def blend_thresholds(self) -> dict[str, float]:
        return {e.name: e.blend_threshold for e in self.edits if e.blend_threshold is not None}

    def guidances(self) -> dict[str, float]:
        return {e.name: e.guidance for e in self.edits if e.guidance is not None}

    def identity_gradients(self) -> dict[str, float]:
        return {e.name: e.identity_gradient for e in self.edits if e.identity_gradient is not None}

    def weights(self) -> dict[str, float]:
        """The tuned weights that differ from 1."""
        return {e.name: e.weight for e in self.edits if e.weight != 1.0}


def _first_problem(error) -> str:
    """A pydantic validation error's first problem in words: the key (``edits.smile.weight``),
    what is wrong, and the value found."""
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"]) or "the file"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    found = repr(problem["input"])
    found = found if len(found) <= 60 else found[:57] + "..."
    if problem["type"] == "missing":
        return f"{where} is missing{more}"
    if problem["type"] in ("model_type", "dict_type"):
        return f"{where} must be a JSON object, got {found}{more}"
    return f"{where}: {problem['msg'][0].lower()}{problem['msg'][1:]}, got {found}{more}"


def pick_edit_adapters(words: dict[str, list[str]], prompt: str, source_prompt: str = "") -> list[str]:
    """Library adapters an edit asks for: those whose words the prompt has and the source prompt
    has not ("a face with a beard and eyeglasses" from "a face with a beard" picks eyeglasses)."""
    asked, there = _words(prompt), _words(source_prompt)
    return [name for name, names in words.items() if asked & set(names) and not there & set(names)]


def _words(text: str) -> set[str]:
    return set("".join(c if c.isalnum() else " " for c in text.lower()).split())


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
