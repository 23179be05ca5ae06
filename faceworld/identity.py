"""Who a FaceWorld person is: the parameters that never change with edits, motion or lighting.

Every identity is drawn from its integer id alone (``identity(17)`` is always the same person, on
every machine), with a random generator seeded by ``(WORLD_SEED, id)``. Ids ``0 .. 999`` are the
training identities (:data:`TRAIN_IDS`); every id ``>= 1000`` is held out (:data:`HELD_OUT_IDS`
is the range ``1000 .. 1999`` that held-out sampling draws from), so identity-preservation can be
measured on people no model has seen.

Geometry is in *face-local* units: a crop of side 1.0 in which the five alignment points of the
person's neutral face lie near ``CANONICAL_FIVE_POINTS`` (eye spacing, nose length and mouth width
vary a little from person to person; the renderer's alignment absorbs that with the project's own
weighted similarity fit, so aligned renders put the points on the canonical ones to well under a
pixel at 64 px).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from ipfacediff.face import CANONICAL_FIVE_POINTS

WORLD_SEED = 0xFACE_D1FF

# The fixed identity split (documented in the module docstring).
TRAIN_IDS = range(0, 1000)
HELD_OUT_START = 1000
HELD_OUT_IDS = range(HELD_OUT_START, 2000)
HELD_OUT = HELD_OUT_IDS  # short alias

RGB = tuple[float, float, float]

# Named hair colours: the values of ``Attributes.hair_colour`` and the natural colours' names.
HAIR_COLOURS: dict[str, RGB] = {
    "black": (30.0, 25.0, 24.0),
    "brown": (92.0, 58.0, 36.0),
    "blonde": (236.0, 200.0, 110.0),
    "red": (182.0, 72.0, 34.0),
    "grey": (168.0, 168.0, 170.0),
    "white": (238.0, 236.0, 232.0),
}
# Natural hair: (name, base RGB, probability). Dark brown and light brown are named "brown".
_NATURAL_HAIR = (
    ("black", (30.0, 25.0, 24.0), 0.28),
    ("brown", (62.0, 40.0, 27.0), 0.25),
    ("brown", (96.0, 62.0, 38.0), 0.18),
    ("brown", (140.0, 100.0, 62.0), 0.08),
    ("red", (170.0, 70.0, 35.0), 0.08),
    ("blonde", (222.0, 186.0, 108.0), 0.13),
)
# Skin tones from very light to very dark.
_SKIN = (
    (255.0, 226.0, 204.0),
    (246.0, 204.0, 176.0),
    (234.0, 184.0, 150.0),
    (212.0, 156.0, 118.0),
    (184.0, 130.0, 94.0),
    (150.0, 98.0, 68.0),
    (112.0, 72.0, 50.0),
    (84.0, 55.0, 40.0),
)
_IRIS = (
    (76.0, 46.0, 26.0),  # brown
    (44.0, 30.0, 22.0),  # dark brown
    (120.0, 92.0, 44.0),  # hazel
    (74.0, 116.0, 64.0),  # green
    (62.0, 104.0, 168.0),  # blue
    (112.0, 124.0, 136.0),  # grey
)
# Eyeglass frame colours: black, tortoise, navy, burgundy, red, gold, silver, white.
_FRAMES = (
    (22.0, 20.0, 20.0),
    (62.0, 36.0, 22.0),
    (20.0, 30.0, 72.0),
    (104.0, 18.0, 30.0),
    (200.0, 36.0, 40.0),
    (222.0, 184.0, 72.0),
    (208.0, 210.0, 218.0),
    (238.0, 238.0, 236.0),
)
HAIR_STYLES = ("short", "buzz", "swept", "bob", "long", "curly", "receding", "bun")
_HAIR_STYLE_P = (0.22, 0.08, 0.16, 0.12, 0.16, 0.10, 0.06, 0.10)
BEARD_STYLES = ("full", "long", "short")
GLASSES_STYLES = ("round", "rect", "wide")
HAT_STYLES = ("beanie", "cap", "fedora")


@dataclass(frozen=True)
class Identity:
    """Everything that makes one FaceWorld person look like themselves (face-local units)."""

    # Head: half-width at the temples, top of the skull, jaw half-width (fraction of the head's),
    # height of the jaw angle, chin height and chin half-width, cheek fullness (0..1).
    head_w: float
    top_y: float
    jaw_w: float
    jaw_y: float
    chin_y: float
    chin_w: float
    cheek: float
    skin: RGB
    # Eyes: height of the eye line, spacing of the centres, width, opening, tilt (radians, outer
    # corner up), iris colour and iris radius (fraction of the eye width).
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: RGB
    iris_r: float
    # Brows: gap above the eye line, length, thickness, arch height, tilt (outer end up).
    brow_dy: float
    brow_len: float
    brow_thick: float
    brow_arch: float
    brow_tilt: float
    # Nose: tip height, half-width of the wings, bridge shading side (-1/+1), tip roundness.
    nose_y: float
    nose_w: float
    nose_side: int
    nose_round: float
    # Mouth: height of the corners, width, lip thicknesses, lip colour.
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_lo: float
    lip: RGB
    # Ears: height, width, vertical centre.
    ear_h: float
    ear_w: float
    ear_y: float
    # Hair (natural): style, colour and its name, hairline height, volume, parting side (-1/0/1).
    hair_style: str
    hair: RGB
    hair_name: str
    hairline_y: float
    hair_volume: float
    part: int
    # Skin marks: freckles and moles, ((x, y, r), ...) in face-local units.
    freckles: tuple[tuple[float, float, float], ...]
    moles: tuple[tuple[float, float, float], ...]
    # How this person's attributes look when switched on (so the same attributes always render
    # the same on the same person): beard cut, glasses frame and colour, hat and colour, shirt.
    beard_style: str
    glasses_style: str
    glasses: RGB
    hat_style: str
    hat: RGB
    shirt: RGB
    texture_seed: int
    id: int = -1

    @classmethod
    def sample(cls, rng: np.random.Generator, id: int = -1) -> Identity:
        """A random person (every field drawn from ``rng``, always in the same order)."""
        u = rng.uniform

        def jitter(rgb: RGB, amount: float) -> RGB:
            """Brightness varies by ``amount``, hue by a third of it."""
            k = 1 + rng.normal(0, amount)
            out = (float(np.clip(c * k * (1 + rng.normal(0, amount / 3)), 0, 255)) for c in rgb)
            return tuple(out)  # type: ignore[return-value]

        def pick(options, p=None):
            return options[int(rng.choice(len(options), p=p))]

        head_w = u(0.255, 0.300)
        skin_i = rng.uniform(0, len(_SKIN) - 1)
        lo, hi = np.array(_SKIN[int(skin_i)]), np.array(_SKIN[min(int(skin_i) + 1, len(_SKIN) - 1)])
        skin = tuple(float(v) for v in lo + (hi - lo) * (skin_i - int(skin_i)))
        skin = jitter(skin, 0.03)
        dark = sum(skin) / 3 < 120
        lip_base = np.array([200.0, 96.0, 98.0]) if not dark else np.array([110.0, 58.0, 58.0])
        lip = tuple(float(v) for v in np.clip(0.55 * lip_base + 0.45 * np.array(skin) * [1.0, 0.72, 0.72], 0, 255))
        lip = jitter(lip, 0.06)
        natural = rng.choice(len(_NATURAL_HAIR), p=[h[2] for h in _NATURAL_HAIR])
        hair_name, hair_base, _ = _NATURAL_HAIR[int(natural)]
        hair = jitter(hair_base, 0.08)
        style = pick(HAIR_STYLES, _HAIR_STYLE_P)
        eye_dx = float(CANONICAL_FIVE_POINTS[1, 0] - CANONICAL_FIVE_POINTS[0, 0]) * u(0.96, 1.04)
        mouth_w = float(CANONICAL_FIVE_POINTS[4, 0] - CANONICAL_FIVE_POINTS[3, 0]) * u(0.93, 1.07)
        freckles: tuple = ()
        if rng.random() < 0.18 and not dark:
            n = int(rng.integers(14, 26))
            side = rng.choice([-1.0, 1.0], n)
            fx = 0.5 + side * rng.uniform(0.03, 0.17, n)
            fy = rng.uniform(0.52, 0.60, n)
            freckles = tuple((float(x), float(y), float(r)) for x, y, r in zip(fx, fy, rng.uniform(0.003, 0.006, n)))
        moles: tuple = ()
        for _ in range(int(rng.choice(3, p=[0.6, 0.3, 0.1]))):
            side = rng.choice([-1.0, 1.0])
            moles += ((float(0.5 + side * u(0.08, 0.20)), float(u(0.52, 0.66)), float(u(0.005, 0.008))),)
        # Frames that stand out from the skin, so eyeglasses read at a glance at 64 px.
        skin_lum = 0.3 * skin[0] + 0.59 * skin[1] + 0.11 * skin[2]
        frames = [f for f in _FRAMES if abs(0.3 * f[0] + 0.59 * f[1] + 0.11 * f[2] - skin_lum) > 90]
        glasses_rgb = frames[int(rng.integers(len(frames)))]
        hat_rgb = pick(
            (
                (200.0, 40.0, 40.0),
                (40.0, 70.0, 160.0),
                (50.0, 120.0, 60.0),
                (230.0, 180.0, 40.0),
                (60.0, 60.0, 66.0),
                (240.0, 240.0, 236.0),
                (150.0, 60.0, 150.0),
            )
        )
        shirt = (float(u(30, 230)), float(u(30, 230)), float(u(30, 230)))
        return cls(
            head_w=head_w,
            top_y=u(0.115, 0.165),
            jaw_w=u(0.68, 0.90),
            jaw_y=u(0.76, 0.81),
            chin_y=u(0.875, 0.915),
            chin_w=u(0.045, 0.095),
            cheek=u(0.0, 1.0),
            skin=skin,
            eye_y=float(CANONICAL_FIVE_POINTS[:2, 1].mean()) + u(-0.004, 0.004),
            eye_dx=eye_dx,
            eye_w=u(0.078, 0.098),
            eye_h=u(0.36, 0.52),
            eye_tilt=u(-0.10, 0.16),
            iris=jitter(pick(_IRIS), 0.06),
            iris_r=u(0.22, 0.28),
            brow_dy=u(0.058, 0.074),
            brow_len=u(0.085, 0.11),
            brow_thick=u(0.012, 0.026),
            brow_arch=u(0.0, 0.022),
            brow_tilt=u(-0.08, 0.10),
            nose_y=float(CANONICAL_FIVE_POINTS[2, 1]) + u(-0.008, 0.008),
            nose_w=u(0.036, 0.058),
            nose_side=int(rng.choice([-1, 1])),
            nose_round=u(0.0, 1.0),
            mouth_y=float(CANONICAL_FIVE_POINTS[3:, 1].mean()) + u(-0.008, 0.008),
            mouth_w=mouth_w,
            lip_up=u(0.010, 0.020),
            lip_lo=u(0.014, 0.028),
            lip=lip,
            ear_h=u(0.10, 0.14),
            ear_w=u(0.045, 0.065),
            ear_y=u(0.51, 0.55),
            hair_style=style,
            hair=hair,
            hair_name=hair_name,
            hairline_y=u(0.255, 0.305),
            hair_volume=u(0.025, 0.06),
            part=int(rng.choice([-1, 0, 1])),
            freckles=freckles,
            moles=moles,
            beard_style=pick(BEARD_STYLES, (0.55, 0.2, 0.25)),
            glasses_style=pick(GLASSES_STYLES),
            glasses=glasses_rgb,
            hat_style=pick(HAT_STYLES),
            hat=hat_rgb,
            shirt=shirt,
            texture_seed=int(rng.integers(0, 2**31 - 1)),
            id=id,
        )

    def neutral_points(self) -> np.ndarray:
        """The five alignment points of the neutral face, face-local (CANONICAL order)."""
        ex, mx = self.eye_dx / 2, self.mouth_w / 2
        return np.array(
            [
                [0.5 - ex, self.eye_y],
                [0.5 + ex, self.eye_y],
                [0.5, self.nose_y],
                [0.5 - mx, self.mouth_y],
                [0.5 + mx, self.mouth_y],
            ]
        )

    def describe(self) -> dict:
        """The parameters as plain JSON-able values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@lru_cache(maxsize=4096)
def identity(identity_id: int) -> Identity:
    """The person with this id: always the same, drawn from ``(WORLD_SEED, id)`` alone."""
    identity_id = int(identity_id)
    if identity_id < 0:
        raise ValueError(f"identity ids are non-negative, got {identity_id}")
    return Identity.sample(np.random.default_rng([WORLD_SEED, identity_id]), id=identity_id)


def is_held_out(identity_id: int) -> bool:
    """Whether an id belongs to the held-out split (every id >= 1000)."""
    return int(identity_id) >= HELD_OUT_START


def split_ids(split: str) -> range:
    """The ids a split samples from: "train" -> TRAIN_IDS, "held_out" (or "test") -> HELD_OUT_IDS."""
    key = split.lower().replace("-", "_")
    if key == "train":
        return TRAIN_IDS
    if key in ("held_out", "heldout", "test", "val"):
        return HELD_OUT_IDS
    raise ValueError(f"unknown split {split!r}: use 'train' or 'held_out'")
