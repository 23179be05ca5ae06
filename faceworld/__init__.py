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
  :func:`write_clip` writes the mp4 and the tracks JSON.
* :func:`dataset` -- aligned training images (image, identity id, attributes, caption).
"""

from faceworld.attributes import EDITS, OLD_AGE, SMILING, Attributes, Edit, caption, region_mask
from faceworld.identity import (
    HAIR_COLOURS,
    HAIR_STYLES,
    HELD_OUT,
    HELD_OUT_IDS,
    TRAIN_IDS,
    WORLD_SEED,
    Identity,
    identity,
    is_held_out,
    split_ids,
)
from faceworld.render import (
    NEUTRAL_POSE,
    Lighting,
    Pose,
    canonical_warp,
    face_outline,
    face_points,
    hair_rgb,
    make_background,
    render_face,
    render_scene,
)
from faceworld.scene import (
    Clip,
    DatasetItem,
    Sample,
    align_pose,
    box_from_points,
    dataset,
    dataset_item,
    random_attributes,
    render_clip,
    write_clip,
)

__all__ = [
    "EDITS",
    "OLD_AGE",
    "SMILING",
    "Attributes",
    "Edit",
    "caption",
    "region_mask",
    "HAIR_COLOURS",
    "HAIR_STYLES",
    "HELD_OUT",
    "HELD_OUT_IDS",
    "TRAIN_IDS",
    "WORLD_SEED",
    "Identity",
    "identity",
    "is_held_out",
    "split_ids",
    "NEUTRAL_POSE",
    "Lighting",
    "Pose",
    "canonical_warp",
    "face_outline",
    "face_points",
    "hair_rgb",
    "make_background",
    "render_face",
    "render_scene",
    "Clip",
    "DatasetItem",
    "Sample",
    "align_pose",
    "box_from_points",
    "dataset",
    "dataset_item",
    "random_attributes",
    "render_clip",
    "write_clip",
]
