"""The settings of an edit as one piece of data.

An edit is decided by some twenty numbers and switches. They used to be written out in the
pipeline's signature, the job's settings, the command line, the web page and the batch manifest's
columns, each with its own defaults and checks; a default changed in one place drifted from the
others (the web page edited with 20 steps, the command line with 50). Here each setting is
declared once, with its default, its range and its help: the command line builds its options from
the fields, the web page and batch read values into it with :meth:`EditSettings.from_mapping`, and
the pipeline takes the object whole. A value is checked when the object is made, so a bad number
is refused where it enters, in one line, before any model is loaded.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ipfacediff.errors import SettingError, UserError

# Defaults from plug-and-play / TokenFlow: features injected over the first 80 % of a 1000-step
# schedule, attention over the first 50 %; CFG 7.5; one keyframe every 8 frames.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_INJECT_FEATURE_UNTIL = 200
DEFAULT_INJECT_ATTENTION_UNTIL = 500
DEFAULT_KEYFRAME_SPACING = 8
DEFAULT_PROPAGATION_TEMPERATURE = 0.0
DEFAULT_TEMPORAL_SMOOTHING = 0.25
DEFAULT_ALL_KEYFRAMES_BELOW = 0  # off
# Local blend: latent tokens where the edit model's prediction under the prompt differs from that
# under the reference by less than this share of the frame's range follow the source trajectory.
DEFAULT_BLEND_THRESHOLD = 0.5
DEFAULT_FADE = 4  # frames: a sixth of a second at 24 fps
# The edited video's libx264 quality: at 16 the encoder moved 1.5 % of a red and white cup's pixels
# in front of an edited face by more than 8 levels, at 12 0.4 % (benchmarks/README.md).
DEFAULT_OUTPUT_CRF = 12
# Frames edited at once: a longer clip is edited in windows that share anchor keyframes. A window's
# inversion is held in memory (its size per frame: benchmarks/README.md).
DEFAULT_WINDOW = 256
# Identity guidance while sampling, for an edit without a tuned value (tuning: benchmarks/README.md).
DEFAULT_IDENTITY_GRADIENT = 0.3
DEFAULT_IDENTITY_GRADIENT_FROM = 200  # the steps feature injection leaves alone (tuning: benchmarks/README.md)
LARGEST_SEED = 2**63 - 1  # torch.Generator takes 64 bits; JSON readers keep 63 exactly
LARGEST_RESOLUTION = 4096

_TRACK_ID = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also takes "²", which int() refuses
_TRUE_WORDS = {"1", "true", "yes", "y", "on"}
_FALSE_WORDS = {"0", "false", "no", "n", "off", ""}


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    multiple_of: int | None = None,
    flag: str | None = None,
    short: str | None = None,
    negative: str | None = None,
    own_check: bool = False,
    label: str | None = None,
) -> Any:
    """A dataclass field that knows its range and its command-line form.

    ``flag`` is the option's name when it is not the field's (``--prompt`` for ``prompt``);
    ``negative`` makes a switch that is on by default an ``--x/--no-x`` pair whose off form is
    the one users type (``--no-local-blend``); ``own_check``: a value the class's own
    ``__post_init__`` reads and checks (not one of the plain kinds); ``label`` is the web page's
    name for it where the field's name, in words, is not a good one."""
    meta = {
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "multiple_of": multiple_of,
        "flag": flag,
        "short": short,
        "negative": negative,
        "own_check": own_check,
        "label": label,
    }
    return field(default=default, metadata=meta)


def flag_of(name: str, meta: dict | None = None) -> str:
    """The command-line option of a setting: ``--blend-threshold`` for ``blend_threshold``."""
    return (meta or {}).get("flag") or "--" + name.replace("_", "-")


def option_names(name: str, meta: dict) -> str:
    """The option as typer declares it: ``--local-blend/--no-local-blend`` for a switch with an
    off form, else its flag."""
    return f"{flag_of(name, meta)}/{meta['negative']}" if meta.get("negative") else flag_of(name, meta)


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e30 else f"{value:g}"


def _range_text(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return (
            f"in {'(' if meta['low_open'] else '['}{_number_text(low)}, {_number_text(high)}"
            f"{')' if meta['high_open'] else ']'}"
        )
    if low is not None:
        return f"{'above' if meta['low_open'] else 'at least'} {_number_text(low)}"
    if high is not None:
        return f"{'below' if meta['high_open'] else 'at most'} {_number_text(high)}"
    return "a number"


def _kind(annotation: str) -> tuple[type, bool]:
    """(base type, may be None) from a field's string annotation."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").replace("None |", "").strip()
    kinds = {"int": int, "float": float, "bool": bool, "str": str, "tuple[str, ...]": tuple}
    kinds["tuple[tuple[str, float], ...]"] = tuple  # typed as texts (PATH:WEIGHT), read into pairs
    return kinds.get(base, str), optional


def field_type(cls: type, name: str) -> Any:
    """The Python type of a setting, for a command-line parser: ``Optional[int]`` for ``int | None``."""
    from typing import Optional

    kind, optional = _kind(str(next(f for f in fields(cls) if f.name == name).type))
    if kind is tuple:
        return Optional[list[str]]
    return Optional[kind] if optional else kind


def default_of(cls: type, name: str) -> Any:
    """A setting's default, for a control that shows it."""
    return next(f for f in fields(cls) if f.name == name).default


def check_number(value: Any, kind: type, label: str, meta: dict) -> int | float:
    """``value`` as a finite ``kind`` inside the setting's range, or a one-line :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{label} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{label} must be a finite number, got {value}")
    if kind is int:
        if value != int(value):
            raise UserError(f"{label} must be an integer, got {value}")
        value = int(value)
    else:
        value = float(value)
    low, high = meta["low"], meta["high"]
    outside = (low is not None and (value < low or (meta["low_open"] and value == low))) or (
        high is not None and (value > high or (meta["high_open"] and value == high))
    )
    if outside:
        raise UserError(f"{label} must be {_range_text(meta)}, got {_number_text(value)}")
    if meta["multiple_of"] and value % meta["multiple_of"]:
        raise UserError(f"{label} must be a multiple of {meta['multiple_of']}, got {_number_text(value)}")
    return value


def check_option(
    value: Any,
    label: str,
    *,
    kind: type = float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A command-line number that is not a setting of an edit (``--cache-max-gb``), checked as the
    settings are: finite, of its kind, in its range; None passes (the option was not given)."""
    if value is None:
        return None
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "multiple_of": None}
    return check_number(value, kind, label, meta)


def is_track_id(text: str) -> bool:
    """A face track's id as a person types it: ASCII digits, spaces around allowed."""
    return bool(_TRACK_ID.fullmatch(text.strip()))


def parse_value(value: Any, kind: type, optional: bool, label: str) -> Any:
    """A value typed by a person (a CSV cell, a web field, a JSON value) as ``kind``."""
    if value is None or (isinstance(value, str) and not value.strip() and kind is not str):
        if optional:
            return None
        if kind is bool:
            return False
        raise UserError(f"{label} needs a value")
    if kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _TRUE_WORDS | _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise UserError(f"{label} must be true or false, got {value!r}")
    if kind is tuple:  # a JSON list, or one cell of ";"-separated items
        items = value if isinstance(value, (list, tuple)) else str(value).split(";")
        return tuple(str(v).strip() for v in items if str(v).strip())
    if kind is str:
        return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise UserError(f"{label} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    return value  # checked by the settings object


SETTING = "{setting}"  # where a SettingError's line names its setting


@contextlib.contextmanager
def naming(name: str) -> Iterator[None]:
    """A one-line error about setting ``name`` (written with :data:`SETTING` where it is named)
    raised as a :class:`SettingError`, which each front-end words its own way."""
    try:
        yield
    except SettingError:
        raise
    except UserError as error:
        raise setting_error(name, str(error)) from None


def flags() -> dict[str, str]:
    """Every setting's command-line flag by field name (``face_prompts`` → ``--face-prompt``), the
    command line's words for a :class:`SettingError`."""
    found: dict[str, str] = {}
    classes = list(Settings.__subclasses__())
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        found.update({f.name: flag_of(f.name, f.metadata) for f in fields(cls)})  # type: ignore[arg-type]
    return found


def setting_error(name: str, template: str) -> SettingError:
    """A :class:`SettingError` whose plain wording (``str()``) is the setting's own flag."""
    error = SettingError(name, template)
    error.args = (error.worded(flags()),)
    return error


def renamed_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each setting's old name (``cls.renamed``) read as its new one, warning once
    per use that the old name is deprecated; a value given under both names is a one-line error."""
    renamed = getattr(cls, "renamed", {})
    if not any(old in values for old in renamed):
        return values
    values = dict(values)
    for old, new in renamed.items():
        if old in values:
            warnings.warn(f"setting {old!r} is now called {new!r}", DeprecationWarning, stacklevel=3)
            if new in values:
                raise UserError(f"{old} is the old name of {new}: give only {new}")
            values[new] = values.pop(old)
    return values


def accept_renamed(cls: type) -> type:
    """Let ``cls(old_name=...)`` keep working for each renamed setting (``cls.renamed``), with a
    DeprecationWarning, so code written against the old names still runs."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **values: Any) -> None:
        init(self, *args, **renamed_values(cls, values))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


class Settings:
    """Shared behaviour of the frozen settings dataclasses: checks on creation, reading from a
    mapping of strings, and the table of options for the docs."""

    renamed: dict[str, str] = {}  # a setting's old name -> its name now (still read, deprecated)

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            kind, optional = _kind(str(f.type))
            value = getattr(self, f.name)
            if (value is None and optional) or f.metadata.get("own_check"):
                continue
            with naming(f.name):
                if kind is tuple:
                    value = () if value is None else value
                    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                        raise UserError(f"{SETTING} must be a list of texts, got {value!r}")
                    object.__setattr__(self, f.name, tuple(value))
                elif kind in (int, float):
                    object.__setattr__(self, f.name, check_number(value, kind, SETTING, dict(f.metadata)))
                elif kind is bool and not isinstance(value, bool):
                    raise UserError(f"{SETTING} must be true or false, got {value!r}")
                elif kind is str and not isinstance(value, str):
                    raise UserError(f"{SETTING} must be text, got {value!r}")
        self.check()

    def check(self) -> None:
        """Checks that involve more than one field or more than a range."""

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, where: str = ""):
        """Settings from values a person typed (strings, numbers, booleans); unknown names and
        bad values are one-line errors prefixed with ``where``."""
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        values = renamed_values(cls, values)
        unknown = sorted(set(values) - set(known))
        prefix = f"{where}: " if where else ""
        if unknown:
            raise UserError(f"{prefix}unknown setting {unknown[0]!r}; known: {', '.join(known)}")
        parsed = {}
        try:
            for name, value in values.items():
                kind, optional = _kind(str(known[name].type))
                with naming(name):
                    parsed[name] = parse_value(value, kind, optional, SETTING)
            return cls(**parsed)
        except SettingError as error:
            raise setting_error(error.setting, f"{prefix}{error.template}") from None
        except UserError as error:
            raise UserError(f"{prefix}{error}") from None
        except TypeError as error:  # a required setting is missing
            raise UserError(f"{prefix}{error}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def options_table(cls) -> str:
        """The Markdown table of the command-line options these settings make: the README carries
        it as written here (a test compares them), so the docs cannot drift from the code.
        ``python -m ipfacediff.settings`` prints it."""
        rows = ["| option | default | meaning |", "|---|---|---|"]
        for f in fields(cls):  # type: ignore[arg-type]
            meta = f.metadata
            if not meta:
                continue
            default = "required" if f.default is MISSING else f.default
            if isinstance(default, bool):
                default = "on" if default else "off"
            rows.append(
                f"| `{option_names(f.name, meta)}` | {default if default not in (None, '') else '—'} | {meta['help']} |"
            )
        return "\n".join(rows)


def parse_time(text: str, label: str) -> tuple[str, float]:
    """``("seconds", s)`` for "1.5" or "1.5s", ``("frame", n)`` for "frame:15"; one line otherwise."""
    value = text.strip().lower()
    try:
        if value.startswith("frame:"):
            frame = int(value.removeprefix("frame:"))
            if frame < 0:
                raise ValueError
            return "frame", frame
        seconds = float(value.removesuffix("s"))
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError
        return "seconds", seconds
    except ValueError:
        raise UserError(f"{label} must be seconds (1.5) or a frame (frame:15), 0 or later, got {text!r}") from None


@dataclass(frozen=True)
class EditSettings(Settings):
    """Everything that decides the result of an edit: written to the run's metadata as it is."""

    renamed = {"identity_guidance": "feature_injection"}  # it switches ε1's feature injection

    prompt: str = setting(MISSING, 'What the face should show, e.g. "a face with eyeglasses".', short="-p")
    source_prompt: str = setting("", "What the input shows; used for inversion and ε1's features.")
    steps: int = setting(
        DEFAULT_STEPS,
        "DDIM steps for inversion and editing, at most SD-1.x's 1000 noise levels (a step the model's schedule "
        "makes from one level to the same one is left out).",
        low=1,
        high=1000,
    )
    guidance: float | None = setting(
        None,
        f"Classifier-free guidance. Default: the value the edit's adapter was tuned with, else {DEFAULT_GUIDANCE}.",
        low=0,
        high=100,
        label="Guidance scale",
    )
    keyframes: int | None = setting(
        None, "Keyframes edited jointly per step. Default: one per 8 frames.", low=1, high=10_000
    )
    random_keyframes: bool = setting(
        True,
        "Keyframes drawn with a new random offset every step (`--even-keyframes`: evenly spaced, the same every step).",
        negative="--even-keyframes",
    )
    propagation_temperature: float = setting(
        DEFAULT_PROPAGATION_TEMPERATURE,
        "How the keyframes' edit reaches the other frames: 0 = each token takes its "
        "single nearest keyframe token (TokenFlow's rule); above 0, a softmax-weighted blend of the keyframe tokens by "
        "feature cosine at this temperature.",
        low=0,
        high=10,
    )
    temporal_smoothing: float = setting(
        DEFAULT_TEMPORAL_SMOOTHING,
        "Each frame's edit takes this share from each neighbouring frame's at every step, "
        "and the local blend's region is filtered over time with the same weights (8 passes), against flicker; 0 = off.",
        low=0,
        high=0.5,
        high_open=True,
    )
    inject_feature_until: int = setting(
        DEFAULT_INJECT_FEATURE_UNTIL,
        "ε1's residual features are injected while the timestep is above this (PnP: the first 80 % of the schedule).",
        low=0,
        high=1000,
        label="Inject features until timestep",
    )
    inject_attention_until: int = setting(
        DEFAULT_INJECT_ATTENTION_UNTIL,
        "ε1's self-attention Q/K are injected while the timestep is above this (PnP: the first 50 %).",
        low=0,
        high=1000,
        label="Inject attention until timestep",
    )
    all_keyframes_below: int = setting(
        DEFAULT_ALL_KEYFRAMES_BELOW,
        "Below this timestep every frame gets its own ε2 pass instead of a propagated "
        "edit (less flicker, more time); 0 = off.",
        low=0,
        high=1000,
        label="Every frame a keyframe below timestep",
    )
    attention_merge: float = setting(
        0.0,
        "Token merging in the keyframes' extended attention: in the UNet's highest-resolution self-attention "
        "this share of each other keyframe's tokens is merged into its most similar ones (ToMe), fewer keys "
        "to attend to; the frame's own tokens stay whole. 0 = off; it changes the result (quality: "
        "benchmarks/README.md).",
        low=0,
        high=0.5,
    )
    strength: float = setting(
        1.0, "Fraction of the schedule re-generated (1 = from the fully inverted noise).", low=0, high=1, low_open=True
    )
    seed: int = setting(
        0, "Seed of the keyframe draws; the same seed gives bit-identical output.", low=0, high=LARGEST_SEED
    )
    feature_injection: bool = setting(
        True,
        "ε1's features and self-attention are injected into ε2 and ε1 inverts the input (off: ε2 inverts and "
        "injects its own, TokenFlow-like; an ablation). Was --identity-guidance.",
        negative="--no-feature-injection",
    )
    identity_gradient: float | None = setting(
        None,
        "Identity guidance while sampling: in the late steps each keyframe's predicted clean face moves up the "
        "gradient of its identity similarity to the source face (the identity net of the model's card, else dlib's) by "
        "this many RMS latent units times the missing similarity, per step; 0 = off. Default: the value the edit's "
        f"adapter was tuned with, else {DEFAULT_IDENTITY_GRADIENT:g}.",
        low=0,
        high=10,
        label="Identity guidance",
    )
    identity_gradient_from: int = setting(
        DEFAULT_IDENTITY_GRADIENT_FROM,
        "Identity guidance acts while the timestep is at or below this (the late "
        "steps, which draw the detail identity rests on).",
        low=0,
        high=1000,
        label="Identity guidance from timestep",
    )
    every_frame: bool = setting(False, "Ablation: edit each frame on its own (the naive baseline).")
    window: int = setting(
        DEFAULT_WINDOW,
        "Frames edited at once: a longer clip is edited in windows of this many "
        "frames that attend to the first window's anchor keyframes and are "
        "cross-faded over 16 shared frames, so memory does not grow with its length.",
        low=32,
        high=1_000_000,
    )
    resolution: int | None = setting(
        None,
        "Side of the aligned face crop. Default: the model's (512 for SD-1.5).",
        low=8,
        high=LARGEST_RESOLUTION,
        multiple_of=8,
    )
    faces: str = setting("all", 'Faces to edit: "all", "largest" or track ids "0,2".')
    face_prompts: tuple[str, ...] = setting(
        (),
        "A face's own prompt, ID=TEXT (repeatable: --face-prompt '1=a face with a beard'); ID= leaves that face "
        "unedited. The other faces take --prompt.",
        flag="--face-prompt",
    )
    start: str = setting(
        "",
        "Edit from here: seconds (1.5) or a frame (frame:15). Default: the clip's start. "
        "Frames outside the range pass through unchanged.",
    )
    end: str = setting(
        "", "Edit up to here, not including it: seconds (2.5) or a frame (frame:25). Default: the clip's end."
    )
    fade: int = setting(
        DEFAULT_FADE,
        "Frames over which the edit fades in after --start and out before --end, so it does not pop in; "
        "shortened, with a note, where the range is too short for the edit to reach full strength.",
        low=0,
        high=10_000,
        label="Fade (frames)",
    )
    crf: int = setting(
        DEFAULT_OUTPUT_CRF,
        "The edited video's quality (libx264's constant rate factor; lower is better): at 12 what the edit leaves, "
        "sharp colour edges beside an edited face included, stays within 8 levels of the input; 16-18 give files "
        "1.3-2 times smaller.",
        low=0,
        high=51,
        label="Output quality (crf)",
    )
    require_face: bool = setting(
        False, "Exit with an error when the video has no face (otherwise its frames pass through)."
    )
    whole_frame: bool = setting(False, "Edit the whole frame (resized to the model's size) instead of face crops.")
    hair: bool = setting(
        False,
        "An edit of the hair: keep the inner face (brows to mouth) and blend the whole crop "
        "back, not just the face (on for a hair adapter).",
        label="Hair edit",
    )
    adapters: str = setting(
        "auto",
        "ε2 adapters of the model's library: \"auto\" (picked by the prompt's words), "
        '"none", or names "eyeglasses" / "eyeglasses:0.8,smile".',
        label="Library adapters (ε2)",
    )
    detail_transfer: bool = setting(
        True, "Put the detail the VAE loses back where the edit changed nothing.", negative="--no-detail-transfer"
    )
    allow_out_of_domain: bool = setting(
        False,
        "Edit faces that the model's card says it was not made for (the embedded FaceWorld model and a real "
        "face); .run.json and the report record the override.",
    )
    local_blend: bool = setting(
        True,
        "Confine the edit to where ε2's prediction under the prompt differs from that under the source prompt.",
        negative="--no-local-blend",
    )
    occlusion: bool = setting(
        True,
        "Leave what is in front of a face (a hand, a cup, a microphone where the model ships a segmenter) as it is: "
        "the paste-back keeps the frame there, no frame hiding the edit's region is a keyframe, and the edit is given the "
        "face behind it (from the face's other frames, or painted by the identity model where no frame shows it, as behind "
        "a microphone held still), so it draws the whole edit around a hand.",
        negative="--no-occlusion",
    )
    blend_threshold: float | None = setting(
        None,
        "Where the edit may change the latents: above this share of the frame's largest prompt-vs-source "
        f"difference. Default: the edit adapter's tuned value, else {DEFAULT_BLEND_THRESHOLD}.",
        low=0,
        high=1,
        high_open=True,
    )

    def check(self) -> None:
        face_ids: set[int] = set()
        for item in self.face_prompts:
            key, sep, _ = item.partition("=")
            if not sep or not is_track_id(key):
                raise setting_error(
                    "face_prompts", f"{SETTING} must be ID=TEXT, e.g. '1=a face with a beard', got {item!r}"
                )
            if int(key) in face_ids:
                raise setting_error("face_prompts", f"{SETTING} gives face {int(key)} two prompts")
            face_ids.add(int(key))
        for name in ("start", "end"):
            if getattr(self, name).strip():
                with naming(name):
                    parse_time(getattr(self, name), SETTING)
        if not self.prompt.strip():
            raise setting_error(
                "prompt", 'the prompt is empty: say what to change, e.g. {setting} "a face with eyeglasses"'
            )
        faces = self.faces.strip()
        if faces not in ("all", "largest") and not all(is_track_id(p) for p in faces.split(",")):
            raise setting_error(
                "faces", f'{SETTING}: bad face selection "{self.faces}": use "all", "largest" or track ids like "0,2"'
            )

    @property
    def identity_guidance(self) -> bool:
        """The old name of :attr:`feature_injection` (read-only), for code written against it."""
        return self.feature_injection

    def face_prompt_ids(self) -> list[int]:
        """The track ids ``--face-prompt`` names, in the order given."""
        return [int(item.partition("=")[0]) for item in self.face_prompts]

    def prompt_for(self, face: int) -> str | None:
        """The prompt of one face: its own, else ``prompt``; None leaves it unedited (``ID=``)."""
        for item in self.face_prompts:
            key, _, text = item.partition("=")
            if int(key) == face:
                return text.strip() or None
        return self.prompt

    def frame_range(self, fps: float, frame_count: int, times: Sequence[float] | None = None) -> range:
        """The frames ``start`` and ``end`` select (the whole clip by default): a frame is in when
        its time -- ``times[index]``, each frame's own (a variable frame rate's), else
        ``index / fps`` -- is at ``start`` or after and before ``end``. An empty, reversed or
        outside range is a one-line error."""

        def index(text: str, label: str, default: int) -> int:
            if not text.strip():
                return default
            unit, value = parse_time(text, label)
            if unit == "frame":
                return int(value)
            if times is not None:
                return bisect.bisect_left(times, value - 1e-6)
            # A time past the clip (1e308 s, whose frame index is inf) is the clip's end.
            return math.ceil(min(value * fps, frame_count) - 1e-6)

        first, stop = index(self.start, "--start", 0), index(self.end, "--end", frame_count)
        where = f"--start {self.start or 0} --end {self.end or 'end'}"
        if first >= frame_count:
            raise UserError(
                f"{where}: the range starts after the clip's last frame "
                f"({frame_count} frames, {frame_count / fps:.2f} s)"
            )
        if stop <= first:
            raise UserError(f"{where}: the range is empty or reversed (frames {first} to {stop})")
        return range(first, min(stop, frame_count))

    def fade_frames(self, frames: range) -> int:
        """The frames the edit fades over at each faded end of ``frames``: ``fade``, shortened so
        that at least one frame of the range shows the whole edit (a fade longer than the range would
        never let the edit reach its full strength)."""
        ends = bool(self.start.strip()) + bool(self.end.strip())
        if not ends:
            return 0
        return max(0, min(self.fade, (len(frames) - 1) // ends))

    def fade_note(self, frames: range) -> str | None:
        """One line saying that the fade was shortened to fit ``frames``, or None when it was not."""
        used = self.fade_frames(frames)
        ends = bool(self.start.strip()) + bool(self.end.strip())
        if not ends or used == self.fade:
            return None
        where = "at each end of" if ends == 2 else "at the start of" if self.start.strip() else "at the end of"
        return (
            f"--fade {self.fade} does not fit {where} the {len(frames)}-frame range: the edit fades over "
            f"{used} frame(s) instead, so that it reaches full strength"
        )

    def fade_weight(self, frame: int, frames: range) -> float:
        """How much of the edit a frame of the range shows: rising over :meth:`fade_frames` frames
        after the range's start and falling before its end, unless the range starts or ends with
        the clip."""
        fade = self.fade_frames(frames)
        weight = 1.0
        if fade and self.start.strip():
            weight = min(weight, (frame - frames.start + 1) / (fade + 1))
        if fade and self.end.strip():
            weight = min(weight, (frames.stop - frame) / (fade + 1))
        return max(0.0, weight)


DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSpec(Settings):
    """Which models an edit runs on, as one record: the key a loaded pipeline is cached under
    (so two requests for the same models share one load), and what the command line, the web page
    and a batch manifest each fill in their own way."""

    model: str | None = setting(
        None,
        "SD-1.x model: diffusers folder, hub id (from the local cache when offline) or single .safetensors file. "
        "Default: the embedded model set.",
        short="-m",
    )
    identity_model: str | None = setting(
        None, "ε1 as a separate UNet (diffusers model or UNet folder, or hub id). Default: the base UNet."
    )
    identity_lora: str | None = setting(
        None, "ε1 as a LoRA adapter (.safetensors, diffusers format) over the base UNet."
    )
    edit_loras: tuple[tuple[str, float], ...] = setting(
        (),
        "ε2 LoRA adapter, PATH or PATH:WEIGHT; repeat for multi-attribute edits.",
        flag="--edit-lora",
        own_check=True,
    )
    adapter_library: bool = setting(
        True,
        "Use the ε1/ε2 adapters the model folder ships (--no-adapter-library: ε1 = ε2 = base unless "
        "--identity-lora/--edit-lora).",
        negative="--no-adapter-library",
    )
    adapters_dir: str | None = setting(
        None,
        "An adapter library kept outside the model folder (what `ipfacediff train library --output LIB` wrote), "
        "used instead of the model folder's own.",
    )
    config: str | None = setting(None, "Architecture (diffusers folder or cached hub id) for a single-file checkpoint.")
    device: str = setting("auto", "auto (CUDA when available), cpu, cuda or cuda:N.")
    dtype: str = setting("auto", "auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16.")
    allow_pickle: bool = setting(
        False, "Also read pickled .bin/.ckpt weights (they can run code: only for files you trust)."
    )
    compile: bool = setting(
        False,
        "torch.compile the UNets (channels-last) once per process: faster edits after a first one that compiles "
        "(minutes); the output differs from the uncompiled one in rounding only. Needs a C compiler on the CPU.",
    )

    def __post_init__(self) -> None:
        for name in ("model", "identity_model", "identity_lora", "adapters_dir", "config"):
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        object.__setattr__(self, "edit_loras", _lora_pairs(self.edit_loras))
        super().__post_init__()

    def check(self) -> None:
        if self.identity_model and self.identity_lora:
            raise setting_error("identity_lora", "give either --identity-model or {setting}, not both")
        if self.adapters_dir is not None and not self.adapter_library:
            raise setting_error(
                "adapters_dir",
                "{setting} names an adapter library and --no-adapter-library turns libraries off: give one of them",
            )
        if self.dtype not in DTYPES:
            raise setting_error("dtype", f"{{setting}} must be one of {', '.join(DTYPES)}; got {self.dtype}")


def _lora_pairs(items: Any) -> tuple[tuple[str, float], ...]:
    """ε2 LoRAs as (path, weight) pairs, from pairs or from texts ``PATH[:WEIGHT]`` as typed."""
    if items is None:
        return ()
    if isinstance(items, str) or not isinstance(items, (list, tuple)):
        raise setting_error("edit_loras", f"{{setting}} must be a list of PATH[:WEIGHT], got {items!r}")
    pairs = []
    for item in items:
        if isinstance(item, str):
            from ipfacediff.adapters.weights import parse_lora_spec

            path, weight = parse_lora_spec(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
            path, weight = os.fspath(item[0]), item[1]
        else:
            raise setting_error("edit_loras", f"{{setting}} must be PATH or PATH:WEIGHT, got {item!r}")
        pairs.append(
            (path, float(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) else weight)
        )
    return tuple(pairs)


accept_renamed(EditSettings)


if __name__ == "__main__":
    print(EditSettings.options_table())
