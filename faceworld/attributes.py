"""The editable attributes of a FaceWorld face, their captions, and the four scored edits.

An :class:`Edit` is the ground truth of one text edit: the caption fragment a user would type,
the attribute change it stands for, and the *region* of the aligned crop (canonical crop
coordinates, side 1.0) the change may touch. Everything the renderer draws for that attribute lies
inside the region, whatever the identity and whatever the other attributes, so a re-render with the
edit applied differs from the original only there; "PSNR outside the edited region" of a model's
edit is measured against the mask of this region.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from faceworld.identity import HAIR_COLOURS


@dataclass(frozen=True)
class Attributes:
    """What an edit may change. Defaults are the plain face ("a face")."""

    eyeglasses: bool = False
    hair_colour: str | None = None  # None: the identity's natural colour; else a HAIR_COLOURS name
    beard: bool = False
    smile: float = 0.0  # 0 neutral .. 1 broad smile with teeth
    age: float = 0.3  # 0 young .. 1 old (wrinkles, greying); captioned "old" from OLD_AGE
    hat: bool = False

    def __post_init__(self) -> None:
        if self.hair_colour is not None and self.hair_colour not in HAIR_COLOURS:
            raise ValueError(f"hair_colour must be None or one of {sorted(HAIR_COLOURS)}, got {self.hair_colour!r}")
        if not 0.0 <= float(self.smile) <= 1.0 or not 0.0 <= float(self.age) <= 1.0:
            raise ValueError("smile and age must lie in [0, 1]")

    def replace(self, **changes: Any) -> Attributes:
        return replace(self, **changes)


SMILING = 0.5  # smile at or above this is captioned "smiling"
OLD_AGE = 0.65  # age at or above this is captioned "old"


def caption(attributes: Attributes) -> str:
    """A short natural caption: "a face", "a smiling face with blonde hair and eyeglasses", ..."""
    adjectives = []
    if attributes.smile >= SMILING:
        adjectives.append("smiling")
    if attributes.age >= OLD_AGE:
        adjectives.append("old")
    extras = []
    if attributes.hair_colour is not None:
        extras.append(f"{attributes.hair_colour} hair")
    if attributes.beard:
        extras.append("a beard")
    if attributes.eyeglasses:
        extras.append("eyeglasses")
    if attributes.hat:
        extras.append("a hat")
    head = " ".join([*adjectives, "face"])
    text = ("an " if head[0] in "aeiou" else "a ") + head
    if extras:
        text += " with " + (extras[0] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1])
    return text


# --- edit regions (canonical crop coordinates) ---------------------------------------------------
# Each region is a list of (polygon, value) drawn in order (value 1 adds, 0 cuts out), so the hair
# region can be "everything around the inner face". They are generous: they hold every identity's
# drawing of the attribute under any expression, with room for yaw/pitch of a scene.

_EYE_BAND = np.array([[0.08, 0.37], [0.92, 0.37], [0.92, 0.585], [0.08, 0.585]])
# The inner face: below the lowest fringe, inside the side locks of long hair, above the chin.
_INNER_FACE = np.array(
    [
        [0.36, 0.375],
        [0.64, 0.375],
        [0.705, 0.44],
        [0.705, 0.66],
        [0.62, 0.835],
        [0.38, 0.835],
        [0.295, 0.66],
        [0.295, 0.44],
    ]
)
_AROUND = np.array([[-0.25, -0.1], [1.25, -0.1], [1.25, 1.35], [-0.25, 1.35]])
_LOWER_FACE = np.array(
    [
        [0.12, 0.43],
        [0.285, 0.43],
        [0.30, 0.575],
        [0.40, 0.628],
        [0.60, 0.628],
        [0.70, 0.575],
        [0.715, 0.43],
        [0.88, 0.43],
        [0.88, 1.12],
        [0.12, 1.12],
    ]
)
_t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
_MOUTH = np.stack([0.5 + 0.225 * np.cos(_t), 0.728 + 0.115 * np.sin(_t)], axis=1)


@dataclass(frozen=True)
class Edit:
    """One scored edit: caption fragment, attribute change, and the region it may touch."""

    name: str
    fragment: str  # what the target caption gains, e.g. "blonde hair"
    changes: tuple[tuple[str, Any], ...]  # attribute -> value
    region: tuple[tuple[np.ndarray, int], ...]  # (polygon in canonical crop coords, 1 add / 0 cut)

    def apply(self, attributes: Attributes) -> Attributes:
        """The attributes with this edit made."""
        return replace(attributes, **dict(self.changes))

    def target_caption(self, attributes: Attributes) -> str:
        return caption(self.apply(attributes))

    def is_noop(self, attributes: Attributes) -> bool:
        return self.apply(attributes) == attributes

    def mask(self, size: int, *, dilate: float = 0.0) -> np.ndarray:
        """The region in an aligned crop of ``size`` pixels: bool (size, size), True inside.

        ``dilate`` grows the region by that many crop sides (e.g. 0.03).
        """
        return region_mask(self.region, np.array([[size, 0.0, 0.0], [0.0, size, 0.0]]), (size, size), dilate * size)

    def polygons(self) -> list[tuple[np.ndarray, int]]:
        return [(p.copy(), v) for p, v in self.region]


def region_mask(region, transform, shape: tuple[int, int], dilate_px: float = 0.0, *, warp=None) -> np.ndarray:
    """Rasterise ``region`` polygons through a 2x3 ``transform`` (canonical -> pixels), or
    through ``warp`` (a function of (N, 2) canonical points -> pixels) when given."""
    w, h = shape
    mask = np.zeros((h, w), np.uint8)
    for poly, value in region:
        dense = _densify(poly)
        pts = warp(dense) if warp is not None else dense @ np.asarray(transform)[:, :2].T + np.asarray(transform)[:, 2]
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], int(value), lineType=cv2.LINE_8, shift=4)
    if dilate_px > 0:
        r = int(np.ceil(dilate_px))
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return mask.astype(bool)


def _densify(poly: np.ndarray, step: float = 0.02) -> np.ndarray:
    """Extra points along the edges, so a non-linear warp bends them."""
    out = []
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        out.append(a + (b - a) * (np.arange(n)[:, None] / n))
    return np.concatenate(out)


EDITS: dict[str, Edit] = {
    "eyeglasses": Edit("eyeglasses", "eyeglasses", (("eyeglasses", True),), ((_EYE_BAND, 1),)),
    "blonde_hair": Edit("blonde_hair", "blonde hair", (("hair_colour", "blonde"),), ((_AROUND, 1), (_INNER_FACE, 0))),
    "beard": Edit("beard", "a beard", (("beard", True),), ((_LOWER_FACE, 1),)),
    "smile": Edit("smile", "smiling", (("smile", 1.0),), ((_MOUTH, 1),)),
}
