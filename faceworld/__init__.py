"""FaceWorld: a synthetic world of faces in which the true answer of every edit is known.

No pretrained face or text model can be downloaded where this project is built and tested, so its
models are trained and scored on FaceWorld: cartoon people drawn with numpy/OpenCV, deterministic
from integer ids and seeds.

* :func:`identity` ``(id)`` -- a person (:class:`Identity`): head shape, skin, eyes, brows, nose,
  mouth, ears, natural hair, freckles/moles. Ids ``< 1000`` are for training
  (:data:`TRAIN_IDS`), ids ``>= 1000`` are held out (:data:`HELD_OUT_IDS`, :func:`is_held_out`).
* :class:`Attributes` -- what edits change: eyeglasses, hair colour, beard, smile, age, hat;
  :func:`caption` turns them into text ("a smiling face with blonde hair and eyeglasses").
* :data:`EDITS` -- the four scored edits (eyeglasses, blonde hair, beard, smile): caption
  fragment, attribute change, and the region of the aligned crop each may touch
  (:meth:`Edit.mask`), for "PSNR outside the edited region".
* :func:`render_face` -- an aligned crop (neutral :class:`Pose`: the five points land on
  ``CANONICAL_FIVE_POINTS * size``), or any pose; :func:`face_points` gives the points.
* :func:`render_clip` -- a scene video (:class:`Clip`) of one or two moving faces with its
  ground-truth tracks; ``clip.with_attributes(...)`` is the same video edited.
  :func:`write_clip` writes the mp4 and the tracks JSON. ``render_clip(..., occluders=["hand"])``
  puts a hand, microphone, cup or passing board (:class:`Occluder`) in front of a face, with its
  true coverage (``clip.occluder_mask(i)``, :func:`save_occluder_masks`).
* :func:`dataset` -- aligned training images (image, identity id, attributes, caption).
"""

from __future__ import annotations

import importlib
import sys
import types

# Where each name lives. They are imported on first use, so that loading the command group
# (an entry point read by every `ipfacediff` start) does not draw the world.
_HOMES = {
    "EDITS": "attributes",
    "OLD_AGE": "attributes",
    "SMILING": "attributes",
    "Attributes": "attributes",
    "Edit": "attributes",
    "caption": "attributes",
    "region_mask": "attributes",
    "HAIR_COLOURS": "identity",
    "HAIR_STYLES": "identity",
    "HELD_OUT": "identity",
    "HELD_OUT_IDS": "identity",
    "TRAIN_IDS": "identity",
    "WORLD_SEED": "identity",
    "Identity": "identity",
    "identity": "identity",
    "is_held_out": "identity",
    "split_ids": "identity",
    "NEUTRAL_POSE": "render",
    "OCCLUDER_KINDS": "render",
    "Lighting": "render",
    "Pose": "render",
    "canonical_warp": "render",
    "face_outline": "render",
    "face_points": "render",
    "hair_rgb": "render",
    "make_background": "render",
    "render_face": "render",
    "render_scene": "render",
    "Clip": "scene",
    "DatasetItem": "scene",
    "Occluder": "scene",
    "occlude_frames": "scene",
    "Sample": "scene",
    "align_pose": "scene",
    "box_from_points": "scene",
    "dataset": "scene",
    "dataset_item": "scene",
    "random_attributes": "scene",
    "render_clip": "scene",
    "write_clip": "scene",
    "save_occluder_masks": "scene",
    "load_occluder_masks": "scene",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


class _World(types.ModuleType):
    """Importing the module faceworld.identity binds it as ``faceworld.identity``, where the
    package's name is the function ``identity``: the function is kept."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _World
