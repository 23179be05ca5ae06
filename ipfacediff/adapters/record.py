"""The adapter library as data: one :class:`AdapterEntry` per ε2 adapter, one :class:`AdapterLibrary`
per ``adapters.json``, read and written here and nowhere else.

Each field of the entry says, beside it, how adapters.json checks it (its limits) and, for a tuned
value, how an edit uses it (:class:`Tuned`: the edit's setting of that name wins when given,
several adapters combine by a rule). The file's schema and the edit's plan are built from those
fields, so a new tuned value is one field here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from ipfacediff.errors import UserError
from ipfacediff.files import check_file, read_json
from ipfacediff.settings import DEFAULT_BLEND_THRESHOLD, DEFAULT_GUIDANCE, DEFAULT_IDENTITY_GRADIENT

ADAPTER_LIBRARY = Path("adapters") / "adapters.json"
# adapters.json's format: 2 added ``values_from`` (a version 1 file's ``"defaults_from": "faceworld
# tuning"`` reads as ``"values_from": "faceworld"``) and ``format_version`` itself.
LIBRARY_FORMAT = 2
VALUES_NEUTRAL = "neutral"  # an entry's values_from: see AdapterEntry
VALUES_FACEWORLD = "faceworld"
VALUES_TUNED = "tuned"
_LEGACY_FACEWORLD_MARK = "faceworld tuning"  # version 1's defaults_from


@dataclass(frozen=True)
class Tuned:
    """How an edit uses a value its adapters were tuned with: the edit's setting ``setting`` (the
    field's own name when None) wins when it is given; otherwise ``combine`` takes the picked
    adapters' values, an adapter without one counting as ``untuned`` (left out when None), and
    with no value at all the edit gets ``default``. ``joins_setting``: the setting is one more
    value to combine rather than an override (``--hair`` asks for a hair edit; a hair adapter does
    too). ``combine`` None: the value is each adapter's own, not the edit's (its weight)."""

    combine: Callable[[Iterable[Any]], Any] | None
    default: Any
    untuned: Any = None
    setting: str | None = None
    joins_setting: bool = False


def _key(default: Any = None, *, required: bool = False, json_type: Any = None, tuned: Tuned | None = None, **limits):
    """A field of :class:`AdapterEntry`: its default, whether adapters.json must have it, the JSON
    type when it is not the field's own, its limits (pydantic's ``ge``, ``lt``, ...) and how an
    edit uses it."""
    return field(
        default=default, metadata={"required": required, "json_type": json_type, "limits": limits, "tuned": tuned}
    )


@dataclass(frozen=True)
class AdapterEntry:
    """One ε2 adapter: its name (the key in adapters.json, its folder and ``--adapters`` name),
    file, the prompt words that pick it, the target prompt it was trained towards, and the values
    its edits were tuned with (None: the edit's setting, else its default)."""

    name: str
    _: KW_ONLY
    path: Path | None = _key(required=True, json_type=str, min_length=1)  # None until it is trained
    words: tuple[str, ...] = _key((), required=True, json_type=list[str])
    target: str = _key("")  # the caption it was trained towards, for the record
    # It changes hair: its edits are blended and pasted back with the hair-extended mask.
    hair: bool = _key(False, tuned=Tuned(any, default=False, untuned=False, joins_setting=True))
    # The local blend's threshold: a shape edit (a smile widens the mouth) needs more room than where
    # the prompt changes the prediction most. Several: the lowest (the widest region).
    blend_threshold: float | None = _key(tuned=Tuned(min, default=DEFAULT_BLEND_THRESHOLD), ge=0, lt=1)
    # The weight it edits at unless the edit names one (None: 1); below 1 (or 0) where the base model
    # already draws the attribute better than the adapter does.
    weight: float | None = _key(tuned=Tuned(None, default=1.0), ge=0, le=4)
    # Classifier-free guidance: an attribute the adapter draws readily needs less push, and less push
    # leaves more of the face. Several: the highest, so none is drawn weaker than tuned.
    guidance: float | None = _key(tuned=Tuned(max, default=DEFAULT_GUIDANCE, untuned=DEFAULT_GUIDANCE), ge=0, le=50)
    # Identity guidance while sampling: an attribute the identity net sees (a beard) is pulled back
    # towards the input's face by it. Several: the lowest, so it pulls back none more than tuned.
    identity_gradient: float | None = _key(
        tuned=Tuned(min, default=DEFAULT_IDENTITY_GRADIENT, untuned=DEFAULT_IDENTITY_GRADIENT), ge=0, le=10
    )
    # The share of the schedule its edits regenerate, at most: an attribute that needs less change keeps
    # more of the input. The edit's strength joins: the lowest of it and the picked adapters' values.
    strength: float | None = _key(tuned=Tuned(min, default=None, joins_setting=True), gt=0, le=1)
    # Where its tuned values came from (kept, not acted on): "neutral" (none: every value is the edit's
    # setting, else its default), "faceworld" (FaceWorld's table, tuned on FaceWorld's models), "tuned"
    # (measured on this model by `train library --tune`; ``tuned_scores`` says how it scored), or
    # another caller's mark; None: a library written before the mark.
    values_from: str | None = _key()
    # The evaluation's scores of the chosen values on the held-out faces (``tuned`` entries): edit
    # score, identity, frames; each grid point's are in the library's training.json.
    tuned_scores: dict[str, float | int] | None = _key()

    def tuned_value(self, name: str) -> Any:
        """The value of tuned field ``name`` an edit with this adapter uses (its default when unset)."""
        value = getattr(self, name)
        return tuned_fields()[name].default if value is None else value

    def has_tuned_values(self) -> bool:
        """Whether it carries any tuned value (one that can be unset: the hair flag is what it does)."""
        return any(
            f.metadata.get("tuned") and f.default is None and getattr(self, f.name) is not None for f in fields(self)
        )

    def to_json(self, root: str | Path | None = None) -> dict:
        """Its adapters.json entry: every key set, in the fields' order (an unset tuned value is
        left out); ``path`` relative to ``root`` when given."""
        entry: dict[str, Any] = {}
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "path":
                value = (Path(value).relative_to(root) if root is not None else Path(value)).as_posix()
            entry[f.name] = list(value) if isinstance(value, tuple) else value
        return entry

    @classmethod
    def from_json(cls, name: str, entry: Mapping[str, Any], root: str | Path | None = None) -> "AdapterEntry":
        """An entry as :func:`entry_schema` checked it (a pydantic model or a mapping of its keys):
        its path joined to ``root``, its words in lower case."""
        values = (
            dict(entry) if isinstance(entry, Mapping) else {f.name: getattr(entry, f.name) for f in fields(cls)[1:]}
        )
        values["path"] = Path(root or "") / values["path"]
        values["words"] = tuple(w.lower() for w in values["words"])
        return cls(name, **values)

    def to_record(self) -> dict:
        """What ``training.json`` records of an edit to train: its name, target, words, hair flag and
        every tuned value (None where unset), the same keys whichever are set."""
        return {
            "name": self.name,
            "target": self.target,
            "words": list(self.words),
            **{name: getattr(self, name) for name in tuned_fields()},
            "values_from": self.values_from,
            "tuned_scores": self.tuned_scores,
        }

    def without_tuned_values(self) -> "AdapterEntry":
        """The entry with every tuned value unset (its hair flag is what it does, not a tuned value):
        an edit with it uses the edit's settings, else their defaults. Marked ``neutral``."""
        unset = {f.name: None for f in fields(self) if f.metadata.get("tuned") and f.default is None}
        return replace(self, **unset, values_from=VALUES_NEUTRAL, tuned_scores=None)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "AdapterEntry":
        """An edit as :meth:`to_record` wrote it (keys a newer writer added are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known and k != "name"}
        return cls(record["name"], **{**values, "words": tuple(values.get("words", ()))})


@cache
def tuned_fields() -> dict[str, Tuned]:
    """The entry's tuned values by name, with how an edit uses each."""
    return {f.name: f.metadata["tuned"] for f in fields(AdapterEntry) if f.metadata.get("tuned")}


def combine_tuned(entries: Iterable[AdapterEntry], settings: Any) -> dict[str, Any]:
    """The tuned values of an edit with ``entries``: for each combined field of :class:`AdapterEntry`,
    the edit's setting when given, else its rule over the entries (see :class:`Tuned`)."""
    entries = list(entries)
    combined = {}
    for name, rule in tuned_fields().items():
        if rule.combine is None:
            continue
        given = getattr(settings, rule.setting or name)
        if given is not None and not rule.joins_setting:
            combined[name] = given
            continue
        values = [rule.untuned if getattr(e, name) is None else getattr(e, name) for e in entries]
        values = [v for v in ([given] if rule.joins_setting else []) + values if v is not None]
        combined[name] = rule.combine(values) if values else rule.default
    return combined


class _Schema(BaseModel):
    """adapters.json as written: exact JSON types (no "0.5" for 0.5, no 1 for true), finite numbers,
    unknown keys ignored (a newer writer's)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


@cache
def entry_schema() -> type[BaseModel]:
    """One entry of ``edits``, built from :class:`AdapterEntry`'s fields: their JSON types, whether
    they are required, their defaults and limits."""
    hints = get_type_hints(AdapterEntry)
    keys = {}
    for f in fields(AdapterEntry)[1:]:
        meta = f.metadata
        default = ... if meta["required"] else f.default
        keys[f.name] = (meta["json_type"] or hints[f.name], Field(default, **meta["limits"]))
    return create_model("AdapterEntrySchema", __base__=_Schema, **keys)


@cache
def library_schema() -> type[BaseModel]:
    """The whole file: paths relative to its folder."""
    return create_model(
        "AdapterLibrarySchema",
        __base__=_Schema,
        identity=(str | None, None),
        edits=(dict[str, entry_schema()], {}),
        identity_net=(str | None, None),
        format_version=(int, Field(1, ge=1)),
    )


def _upgrade(spec: Any) -> Any:
    """A version 1 adapters.json as version 2 reads it: its FaceWorld mark becomes ``values_from``
    (other content, and anything not a JSON object, is left for the schema to judge)."""
    if (
        not isinstance(spec, Mapping)
        or spec.get("format_version", 1) != 1
        or not isinstance(spec.get("edits"), Mapping)
    ):
        return spec
    edits = {}
    for name, entry in spec["edits"].items():
        if isinstance(entry, Mapping) and "values_from" not in entry and "defaults_from" in entry:
            entry = {k: v for k, v in entry.items() if k != "defaults_from"}
            if spec["edits"][name]["defaults_from"] == _LEGACY_FACEWORLD_MARK:
                entry["values_from"] = VALUES_FACEWORLD
        edits[name] = entry
    return {**spec, "edits": edits}


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

    An entry's keys are :class:`AdapterEntry`'s fields (each says what it does and, for a tuned
    value, how several adapters combine). ``identity_net`` (optional, relative to the library): the
    identity net ε1 was trained against (``train library --identity-net``), which identity guidance
    uses unless the model's card names one; without it, dlib's. Other keys are ignored.

    A library may also live outside the model folder (``ipfacediff train library --output LIB``,
    read with ``--adapters-dir LIB``: :meth:`read_dir`); its paths are relative to LIB.
    """

    identity: Path | None
    edits: tuple[AdapterEntry, ...]
    identity_net: Path | None = None  # the identity net ε1 was trained against, when not dlib's

    def to_json(self, root: str | Path | None = None) -> dict:
        """adapters.json's content: paths relative to ``root`` when given (the library's folder)."""

        def relative(path: Path | None) -> str | None:
            return (
                None if path is None else (Path(path).relative_to(root) if root is not None else Path(path)).as_posix()
            )

        library = {
            "format_version": LIBRARY_FORMAT,
            "identity": relative(self.identity),
            "edits": {e.name: e.to_json(root) for e in self.edits},
        }
        if self.identity_net is not None:
            library["identity_net"] = relative(self.identity_net)
        return library

    @classmethod
    def from_json(
        cls, spec: Any, root: str | Path | None = None, *, file: Path | None = None, fix: str = ""
    ) -> "AdapterLibrary":
        """A library from adapters.json's content, checked against its schema: a problem is one
        UserError line naming ``file`` and the key; paths are joined to ``root``."""
        from pydantic import ValidationError

        try:
            valid = library_schema().model_validate(_upgrade(spec))
        except ValidationError as error:
            where = file if file is not None else "the adapter library"
            raise UserError(f"{where} is not a valid adapter library ({_first_problem(error)}); {fix}") from None
        base = Path(root or "")
        return cls(
            base / valid.identity if valid.identity else None,
            tuple(AdapterEntry.from_json(name, entry, root) for name, entry in valid.edits.items()),
            base / valid.identity_net if valid.identity_net else None,
        )

    @classmethod
    def read(cls, model_folder: str | Path) -> "AdapterLibrary | None":
        """``MODEL/adapters/adapters.json``, or None when the model folder has none."""
        file = Path(model_folder).expanduser() / ADAPTER_LIBRARY
        if not os.path.lexists(file):
            return None
        return cls._read_file(
            file, "fix it (see AdapterLibrary in ipfacediff/adapters/record.py) or pass --no-adapter-library"
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
            "fix it (see AdapterLibrary in ipfacediff/adapters/record.py) or build the library "
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
        return cls.from_json(read_json(file, "adapter library", fix), file.parent, file=file, fix=fix)

    def entry(self, name: str) -> AdapterEntry:
        """The entry ``name``; one the library lacks (an ``--edit-lora``) is an entry with no tuned value."""
        return next((e for e in self.edits if e.name == name), None) or AdapterEntry(name)

    def without_edits(self) -> "AdapterLibrary":
        """The library with ε1 (and its identity net) only: explicit edit LoRAs replace its edits."""
        return replace(self, edits=())

    def words(self) -> dict[str, list[str]]:
        return {e.name: list(e.words) for e in self.edits}

    def tuned(self, name: str) -> dict[str, Any]:
        """The adapters' values of tuned field ``name``, where set."""
        return {e.name: getattr(e, name) for e in self.edits if getattr(e, name) is not None}

    def blend_thresholds(self) -> dict[str, float]:
        return self.tuned("blend_threshold")

    def guidances(self) -> dict[str, float]:
        return self.tuned("guidance")

    def identity_gradients(self) -> dict[str, float]:
        return self.tuned("identity_gradient")

    def weights(self) -> dict[str, float]:
        """The tuned weights that differ from 1."""
        return {name: weight for name, weight in self.tuned("weight").items() if weight != 1.0}


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
