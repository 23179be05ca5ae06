"""``train library --tune``: each edit's weight, guidance and blend threshold measured on the model.

FaceWorld's tuned values (:data:`~ipfacediff.adapters.edits.BUILTIN_EDITS`) fit FaceWorld's models
only; a new fine-tune starts from neutral values (the edit's settings' defaults). Tuning measures
instead: every point of a small grid (:class:`TuneGrid`) edits the same held-out faces of
``--data`` (faces none of the library's adapters trained on) with the edit's new adapter, each edit
is scored with the evaluation's own figures (:class:`~ipfacediff.evaluation.CropScorer`:
``clip_direction``, the directional CLIP edit score, and ``id_sim``, the identity cosine), and
:func:`choose_point` picks one by :data:`RULE`. Each point's scores go into the library's
``training.json`` as they are measured, so a killed run measures only the points it lacks.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ipfacediff.adapters.record import AdapterEntry
from ipfacediff.errors import UserError
from ipfacediff.evaluation.metrics import ID_SAME_PERSON_COSINE
from ipfacediff.settings import DEFAULT_BLEND_THRESHOLD, DEFAULT_GUIDANCE
from ipfacediff.training_settings import DEFAULT_TUNE_FRAMES, DEFAULT_TUNE_STEPS  # noqa: F401 - build's defaults

TUNED_VALUES = ("weight", "guidance", "blend_threshold")  # AdapterEntry's fields a grid point sets
SCORES = ("clip_direction", "id_sim", "clip_score", "clip_score_original")  # recorded per grid point
RULE = (
    "the highest clip_direction among the grid points whose id_sim is at least "
    f"{ID_SAME_PERSON_COSINE} (the evaluation's same-person line); with none, the highest id_sim"
)
_LIMITS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


@dataclass(frozen=True)
class TuneGrid:
    """The values tried per edit: every combination of the three. The default holds the neutral
    values (weight 1, the default guidance and blend threshold), so tuning can keep them, and the
    directions FaceWorld's tuning moved (a lower weight, less guidance, a wider blend region)."""

    weight: tuple[float, ...] = (0.3, 0.6, 1.0)
    guidance: tuple[float, ...] = (5.0, DEFAULT_GUIDANCE)
    blend_threshold: tuple[float, ...] = (0.3, DEFAULT_BLEND_THRESHOLD)

    @classmethod
    def parse(cls, text: str | None) -> "TuneGrid":
        """``--tune-grid "weight=0.5,1;guidance=7.5;blend_threshold=0.5"``: each value's list (the
        others keep the default's), every value within adapters.json's limits of its field; a
        mistake is one UserError line."""
        if text is None or not text.strip():
            return cls()
        axes: dict[str, tuple[float, ...]] = {}
        for part in filter(None, (p.strip() for p in text.replace("\n", ";").split(";"))):
            name, equals, values = (piece.strip() for piece in part.partition("="))
            if name not in TUNED_VALUES or not equals:
                raise UserError(
                    f"--tune-grid: {part!r} is not NAME=V1,V2,...: NAME is one of {', '.join(TUNED_VALUES)}, "
                    'e.g. "weight=0.5,1;guidance=5,7.5;blend_threshold=0.5"'
                )
            if name in axes:
                raise UserError(f"--tune-grid names {name} twice: give each value's list once")
            axes[name] = tuple(dict.fromkeys(_grid_value(name, v) for v in values.split(",") if v.strip()))
            if not axes[name]:
                raise UserError(f"--tune-grid: {name}= lists no value")
        return cls(**axes)

    def points(self) -> list[dict[str, float]]:
        """Every combination, weight slowest (the inversion, shared by all, is cached)."""
        return [
            {"weight": w, "guidance": g, "blend_threshold": b}
            for w in self.weight
            for g in self.guidance
            for b in self.blend_threshold
        ]

    def to_json(self) -> dict[str, list[float]]:
        return {name: list(getattr(self, name)) for name in TUNED_VALUES}


def _grid_value(name: str, text: str) -> float:
    limits = next(f for f in fields(AdapterEntry) if f.name == name).metadata["limits"]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not all(_LIMITS[key](value, bound) for key, bound in limits.items()):
        bounds = ", ".join(f"{key} {bound}" for key, bound in limits.items())
        raise UserError(f"--tune-grid: {name} value {text.strip()!r} must be a number ({bounds})")
    return value


def choose_point(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid point :data:`RULE` picks. Why: a stronger edit is better only while the face stays
    the person's, and the evaluation's own same-person line says where that ends, so no new
    constant is needed; where no point keeps the person, the one that harms the face least. Ties
    go to the higher identity, then to the earlier point."""
    same = [p for p in points if p["id_sim"] >= ID_SAME_PERSON_COSINE]
    if same:
        return max(same, key=lambda p: (p["clip_direction"], p["id_sim"]))
    return max(points, key=lambda p: (p["id_sim"], p["clip_direction"]))


def tuning_key(adapter: Path, faces: np.ndarray, **parts: Any) -> str:
    """What a grid point's scores depend on beyond its values: the adapter file, the held-out
    faces, and ``parts`` (target, source, steps, seed, CLIP model); a change drops the scores."""
    digest = hashlib.sha256()
    digest.update(adapter.read_bytes())
    digest.update(np.ascontiguousarray(faces).tobytes())
    digest.update(repr(sorted(parts.items())).encode())
    return digest.hexdigest()[:16]


def tune_edits(
    pipeline,
    faces: np.ndarray,
    edits: list[AdapterEntry],
    adapters: dict[str, Path],
    record: dict,
    *,
    grid: TuneGrid,
    scorer: Callable[..., dict],
    source: str,
    steps: int,
    seed: int,
    clip: str,
    cache=None,
    save: Callable[[], None] = lambda: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict]:
    """Measure every grid point of every edit on ``faces`` and choose one per edit; returns
    ``record`` (training.json's ``tuning.edits``, updated in place: per edit its key, each point's
    values and scores, and the chosen point). Points already in ``record`` under the same key are
    not measured again; ``save()`` follows every new point, so a killed run keeps what it measured.
    ``pipeline``: an :class:`~ipfacediff.editing.pipeline.IPFaceDiffPipeline` with the library;
    ``scorer``: a :class:`~ipfacediff.evaluation.CropScorer`."""
    from ipfacediff.settings import EditSettings

    points = grid.points()
    total, done = len(edits) * len(points), 0
    for edit in edits:
        key = tuning_key(
            adapters[edit.name], faces, target=edit.target, source=source, steps=steps, seed=seed, clip=clip
        )
        if record.get(edit.name, {}).get("key") != key:
            record[edit.name] = {"key": key, "points": []}
        measured = record[edit.name]["points"]
        for point in points:
            if not any(all(m[k] == point[k] for k in TUNED_VALUES) for m in measured):
                settings = EditSettings(
                    prompt=edit.target,
                    source_prompt=source,
                    adapters=f"{edit.name}:{point['weight']}",
                    guidance=point["guidance"],
                    blend_threshold=point["blend_threshold"],
                    steps=steps,
                    seed=seed,
                )
                edited = pipeline(faces, settings, cache=cache).frames
                scores = scorer(faces, edited, edit.target, source)
                measured.append({**point, **{name: _rounded(scores[name]) for name in SCORES}})
                save()
            done += 1
            if progress:
                progress("tune", done, total)
        in_grid = [m for m in measured if any(all(m[k] == p[k] for k in TUNED_VALUES) for p in points)]
        record[edit.name]["chosen"] = choose_point(in_grid)
        save()
    return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 5)
