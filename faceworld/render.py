"""Drawing FaceWorld faces: aligned crops and posed faces in scenes.

How a face is drawn
    Every part of a face (head, ears, hair, eyes, brows, nose, mouth, beard, glasses, hat, neck
    and shoulders) is a polygon or polyline in *face-local* coordinates (a crop of side 1.0, see
    :mod:`faceworld.identity`). For a pose the points go through one chain:

    1. head turn: each point gets a depth (a flattened ellipsoid head plus the part's protrusion,
       e.g. the nose tip stands out) and is rotated by yaw about a vertical axis and by pitch about
       a horizontal one, so features shift, the far side squashes and the nose leads;
    2. the identity's alignment ``A``: the project's weighted similarity fit
       (:func:`ipfacediff.face.similarity_transform` with ``ALIGNMENT_WEIGHTS``) taking the
       person's neutral five points onto ``CANONICAL_FIVE_POINTS``;
    3. the placement ``P`` of the crop in the image: centre, side and in-plane rotation (roll).
       Shoulders follow the placement without roll or head turn; the neck blends the two.

    The five alignment points go through the very same chain, so :func:`face_points` is exact.
    With the neutral pose an image of side ``size`` *is* an aligned crop: the points land on
    ``CANONICAL_FIVE_POINTS * size`` (pixel centres at integer coordinates, as warpAffine and
    :func:`ipfacediff.face.crop_face` count them), up to the fit residual of the person's
    slightly individual geometry (< 0.75 px at 64 px for every id up to 1999).

    Drawing is done at ``SS`` times the resolution with hard-edged fills (a 4-channel canvas:
    colour and coverage) and box-downsampled (INTER_AREA), which anti-aliases every edge the same
    way and keeps each output pixel a function of its own footprint only. Lighting (a shaded
    ellipsoid plus a directional gradient), global brightness and a warm/cool cast are applied per
    output pixel afterwards, so changing an attribute changes exactly the pixels its parts cover.

Determinism
    Nothing here draws random numbers at render time: identities carry their own texture seed
    and every textured part (hair strands, stubble) is drawn from it when the identity's geometry
    is first built (cached). Same inputs, same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np

from ipfacediff.face import ALIGNMENT_WEIGHTS, CANONICAL_FIVE_POINTS, similarity_transform
from faceworld.attributes import Attributes
from faceworld.identity import HAIR_COLOURS, Identity

# --- poses and light ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pose:
    """Where and how a face is shown.

    ``x``, ``y``: centre of the face's crop as fractions of the image width and height;
    ``scale``: side of the crop as a fraction of the image's shorter side (``Pose()`` fills the
    image: an aligned crop); ``roll``: in-plane rotation, degrees, clockwise on screen;
    ``yaw``: head turn, degrees, positive turns the face towards image right; ``pitch``: nod,
    degrees, positive looks down; ``eyes_open``: 1 open .. 0 shut (blinks); ``mouth_open``:
    0 closed .. 1 open (talking).
    """

    x: float = 0.5
    y: float = 0.5
    scale: float = 1.0
    roll: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    eyes_open: float = 1.0
    mouth_open: float = 0.0

    def replace(self, **changes) -> Pose:
        return replace(self, **changes)


NEUTRAL_POSE = Pose()


@dataclass(frozen=True)
class Lighting:
    """Light on the scene: ``azimuth`` is where the light comes from in the image plane (degrees,
    0 = image right, 90 = top, 180 = left); ``elevation`` its height above the image plane (90 =
    straight from the camera: flat); ``strength`` 0 (flat) .. 1 (hard shading); ``brightness``
    a global gain; ``warmth`` -1 (blue cast) .. 1 (orange cast)."""

    azimuth: float = 120.0
    elevation: float = 55.0
    strength: float = 0.35
    brightness: float = 1.0
    warmth: float = 0.0

    def replace(self, **changes) -> Lighting:
        return replace(self, **changes)


# --- small geometry helpers -----------------------------------------------------------------------


def _qcurve(p0, mid, p2, n: int = 9) -> np.ndarray:
    """Quadratic curve from p0 to p2 passing through ``mid`` at its middle."""
    p0, mid, p2 = (np.asarray(p, float) for p in (p0, mid, p2))
    c = 2 * mid - (p0 + p2) / 2
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p2


def _catmull(points, n: int = 6, closed: bool = False) -> np.ndarray:
    """Catmull-Rom spline through ``points`` (n samples per segment)."""
    p = np.asarray(points, float)
    if closed:
        ext = np.concatenate([p[-1:], p, p[:2]])
        segs = len(p)
    else:
        ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
        segs = len(p) - 1
    t = np.linspace(0, 1, n, endpoint=False)[:, None]
    out = []
    for i in range(segs):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        out.append(
            0.5
            * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    if not closed:
        out.append(p[-1:])
    return np.concatenate(out)


def _ellipse(cx, cy, rx, ry, n: int = 18, rot: float = 0.0, a0: float = 0.0, a1: float = 2 * np.pi) -> np.ndarray:
    full = abs(a1 - a0 - 2 * np.pi) < 1e-9
    a = np.linspace(a0, a1, n, endpoint=not full)
    x, y = rx * np.cos(a), ry * np.sin(a)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _resample(curve: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along an open polyline."""
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0, s[-1], n)
    return np.stack([np.interp(t, s, curve[:, 0]), np.interp(t, s, curve[:, 1])], axis=1)


def _mix(a, b, t: float):
    return tuple(float(x) * (1 - t) + float(y) * t for x, y in zip(a, b))


def _scale(rgb, k: float, add: float = 0.0):
    return tuple(min(255.0, max(0.0, float(c) * k + add)) for c in rgb)


def _grey(rgb):
    g = 0.3 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2]
    return (g, g, g)


# --- static geometry of one identity ----------------------------------------------------------------

HEAD_DEPTH = 0.30  # depth of the face plane in front of the turning axis (face-local units)
_PIVOT = 0.08  # depth of the yaw/pitch pivot: outline points barely move, features lead
_YC = 0.55  # height of the pitch axis
_BROW_Z, _EYE_Z, _NOSE_TIP_Z, _NOSE_Z, _LIP_Z = 0.012, -0.004, 0.075, 0.04, 0.018
_GLASSES_Z, _HAIR_Z, _HAT_Z, _BEARD_Z = 0.05, 0.02, 0.03, 0.012
_DOWN = np.array([0.0, 1.0])


@dataclass
class _Geometry:
    align: np.ndarray  # 2x3, face-local -> canonical
    align_scale: float
    outline: np.ndarray  # closed head outline
    prof_y: np.ndarray  # half-width profile of the head
    prof_w: np.ndarray
    oval: np.ndarray  # 36-point face silhouette (mesh FACE_OVAL order)
    parts: dict  # name -> list of (kind, pts, colour key / rgb, param, prot, body)


def _half_width(g: _Geometry, y: np.ndarray) -> np.ndarray:
    return np.interp(y, g.prof_y, g.prof_w, left=0.0, right=0.0)


def _head_outline(idt: Identity) -> np.ndarray:
    W, T = idt.head_w, idt.top_y
    jw = idt.jaw_w * W
    right = [
        (0.0, T),
        (0.58 * W, T + 0.028),
        (0.90 * W, T + 0.11),
        (W, 0.36),
        (0.985 * W, 0.47),
        ((0.93 + 0.05 * idt.cheek) * W, 0.585),
        (jw + 0.25 * (W - jw), 0.5 * (0.585 + idt.jaw_y) + 0.03),
        (jw, idt.jaw_y),
        (idt.chin_w + 0.45 * (jw - idt.chin_w), 0.5 * (idt.jaw_y + idt.chin_y) + 0.02),
        (idt.chin_w, idt.chin_y - 0.012),
        (0.0, idt.chin_y),
    ]
    loop = [(0.5 + x, y) for x, y in right] + [(0.5 - x, y) for x, y in right[-2:0:-1]]
    return _catmull(loop, n=5, closed=True)


def _face_oval(outline: np.ndarray, W: float) -> np.ndarray:
    """36 points around the face from the forehead top, clockwise on screen (as the mesh oval)."""
    cx, cy = 0.5, 0.60
    d = outline - [cx, cy]
    ang = np.arctan2(d[:, 1], d[:, 0])
    rad = np.hypot(d[:, 0], d[:, 1])
    order = np.argsort(ang)
    ang, rad = ang[order], rad[order]
    want = np.deg2rad(-90.0 + 10.0 * np.arange(36))
    want = (want + np.pi) % (2 * np.pi) - np.pi
    r = np.interp(want, ang, rad, period=2 * np.pi)
    # The mesh oval stops at the forehead top: cap the upper half by an ellipse reaching y=0.30.
    ex, ey = W, cy - 0.30
    r_ell = 1.0 / np.sqrt((np.cos(want) / ex) ** 2 + (np.sin(want) / ey) ** 2)
    r = np.where(np.sin(want) < 0, np.minimum(r, r_ell), r)
    return np.stack([cx + r * np.cos(want), cy + r * np.sin(want)], axis=1)


def _band(outer: np.ndarray, inner: np.ndarray, n: int = 40):
    """A hair band between two contours running the same way: polygon, and (start, end) strands."""
    o, i = _resample(outer, n), _resample(inner, n)
    poly = np.concatenate([o, i[::-1]])
    return poly, o, i


def _strands(o: np.ndarray, i: np.ndarray, rng: np.random.Generator, count: int, lean: int = 2) -> list[np.ndarray]:
    """Curved strokes across a band, from near its outer edge to near its inner edge."""
    n = len(o)
    out = []
    for k in rng.choice(np.arange(1, n - 1), size=min(count, n - 2), replace=False):
        k2 = int(np.clip(k + rng.integers(-lean, lean + 1), 0, n - 1))
        a = o[k] * 0.85 + i[k] * 0.15
        b = o[k2] * 0.12 + i[k2] * 0.88
        mid = (a + b) / 2 + (o[k] - i[k]) * rng.uniform(-0.1, 0.1)
        out.append(_qcurve(a, mid, b, 6))
    return out


def _strands_along(o: np.ndarray, i: np.ndarray, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Strokes running along a band (hair that flows from the parting down the sides)."""
    n = len(o)
    out = []
    for _ in range(count):
        length = int(rng.integers(n // 4, n // 2))
        k0 = int(rng.integers(0, n - length))
        t = rng.uniform(0.12, 0.88)
        idx = np.linspace(k0, k0 + length - 1, 8).astype(int)
        out.append(o[idx] * (1 - t) + i[idx] * t)
    return out


def _skull(g_outline: np.ndarray, y_end: float, grow: float, bumps: float = 0.0, seed: int = 0) -> np.ndarray:
    """The outline above ``y_end`` (left bottom -> over the top -> right bottom), pushed outward."""
    pts = g_outline
    top = int(np.argmin(pts[:, 1]))
    pts = np.roll(pts, -top, axis=0)  # start at the top, run clockwise (to image right first)
    right = pts[: len(pts) // 2]
    right = right[right[:, 1] <= y_end]
    right = np.concatenate([right, [[0.5 + np.interp(y_end, right[:, 1], right[:, 0] - 0.5), y_end]]])
    left = right[::-1] * [-1, 1] + [1, 0]
    arc = np.concatenate([left[:-1], right])
    c = np.array([0.5, 0.52])
    d = arc - c
    r = np.hypot(d[:, 0], d[:, 1])
    top_weight = np.clip((c[1] - arc[:, 1]) / (c[1] - arc[:, 1].min()), 0, 1)
    grow_r = grow * (0.55 + 0.45 * top_weight)
    if bumps:
        ang = np.arctan2(d[:, 1], d[:, 0])
        phase = np.random.default_rng(seed).uniform(0, 2 * np.pi)
        grow_r = grow_r + bumps * np.abs(np.sin(ang * 9 + phase))
    return c + d * ((r + grow_r) / r)[:, None]


@lru_cache(maxsize=2048)
def _geometry(idt: Identity) -> _Geometry:
    rng = np.random.default_rng(idt.texture_seed)
    align = similarity_transform(idt.neutral_points(), CANONICAL_FIVE_POINTS, ALIGNMENT_WEIGHTS)
    outline = _head_outline(idt)
    top = int(np.argmin(outline[:, 1]))
    chin = int(np.argmax(outline[:, 1]))
    rolled = np.roll(outline, -top, axis=0)
    right = rolled[: (chin - top) % len(outline) + 1]
    prof_y, prof_w = right[:, 1], right[:, 0] - 0.5
    order = np.argsort(prof_y)
    g = _Geometry(
        align,
        float(np.hypot(*align[:, 0])),
        outline,
        prof_y[order],
        np.maximum(prof_w[order], 0.0),
        _face_oval(outline, idt.head_w),
        {},
    )
    W = idt.head_w
    parts = g.parts

    # Body: neck (top follows the head, bottom the shoulders) and shirt.
    nw = 0.56 * idt.jaw_w * W + 0.02
    top_y = idt.jaw_y - 0.08
    neck = np.array([[0.5 - nw, top_y], [0.5 + nw, top_y], [0.5 + nw * 1.04, 1.06], [0.5 - nw * 1.04, 1.06]])
    shirt_side = [(0.5 + nw, 1.005), (0.8, 1.04), (1.0, 1.12), (1.12, 1.34), (1.16, 2.2)]
    shirt = np.array([*shirt_side, *[(1 - x, y) for x, y in shirt_side[::-1]]])
    collar = _qcurve((0.5 - nw * 1.02, 1.0), (0.5, 1.095), (0.5 + nw * 1.02, 1.0), 9)
    parts["body"] = [
        ("fill", shirt, "shirt", 0, 0.0, 1.0),
        ("fill", neck, "neck", 0, 0.0, np.array([0.0, 0.0, 1.0, 1.0])),
        ("fill", np.concatenate([collar, [[0.5, 0.97]]]), "neck", 0, 0.0, 1.0),
    ]

    # Ears, behind the head; the helix line runs round the outer side.
    ears = []
    for s in (-1, 1):
        cx = 0.5 + s * (W - 0.012 + 0.3 * idt.ear_w)
        ear = _ellipse(cx, idt.ear_y, idt.ear_w / 2, idt.ear_h / 2, 16, rot=s * 0.12)
        a0 = -np.pi / 2 if s > 0 else np.pi / 2
        inner = _ellipse(
            cx + s * 0.004, idt.ear_y, idt.ear_w * 0.28, idt.ear_h * 0.33, 9, rot=s * 0.12, a0=a0, a1=a0 + np.pi
        )
        ears += [("fill", ear, "ear", 0, 0.0, 0.0), ("line", inner, "ear_line", 0.007, 0.0, 0.0)]
    parts["ears"] = ears
    parts["head"] = [("fill", outline, "skin", 0, 0.0, 0.0)]

    # Skin marks.
    marks = [("fill", _ellipse(x, y, r, r, 8), "freckle", 0, 0.0, 0.0) for x, y, r in idt.freckles]
    marks += [("fill", _ellipse(x, y, r, r, 10), "mole", 0, 0.0, 0.0) for x, y, r in idt.moles]
    parts["marks"] = marks

    # Brows.
    brows = []
    for s in (-1, 1):
        ex = 0.5 + s * idt.eye_dx / 2
        x_in = ex - s * idt.brow_len * 0.48
        x_out = x_in + s * idt.brow_len
        yb = idt.eye_y - idt.brow_dy
        p_in, p_out = np.array([x_in, yb + 0.004]), np.array([x_out, yb - idt.brow_tilt * idt.brow_len + 0.006])
        mid = (p_in + p_out) / 2 + [s * 0.012, -idt.brow_arch]
        centre = _qcurve(p_in, mid, p_out, 9)
        th = idt.brow_thick * np.linspace(1.0, 0.45, 9)[:, None]
        upper = centre + [0, -1] * th * 0.5
        lower = centre + [0, 1] * th * 0.5
        brows.append(("fill", np.concatenate([upper, lower[::-1]]), "brow", 0, _BROW_Z, 0.0))
    parts["brows"] = brows

    # Nose.
    ny, nwid = idt.nose_y, idt.nose_w
    s = idt.nose_side
    tip = _ellipse(0.5, ny - 0.006, 0.017 + 0.008 * idt.nose_round, 0.013, 12)
    base = _qcurve((0.5 - nwid * 0.95, ny + 0.006), (0.5, ny + 0.024), (0.5 + nwid * 0.95, ny + 0.006), 9)
    nose = [("fill", tip, "nose_tip", 0, _NOSE_TIP_Z, 0.0), ("line", base, "nose_base", 0.009, _NOSE_Z, 0.0)]
    for side in (-1, 1):
        # The wing: an arc round the outer side of each nostril.
        a0 = -np.pi / 2 - 0.4 if side > 0 else np.pi / 2 - 0.2
        wing = _ellipse(0.5 + side * nwid * 0.95, ny + 0.001, 0.013, 0.015, 7, a0=a0, a1=a0 + np.pi + 0.6)
        nostril = _ellipse(0.5 + side * nwid * 0.45, ny + 0.015, 0.011, 0.0055, 8, rot=side * 0.3)
        nose += [("line", wing, "nose_wing", 0.008, _NOSE_Z, 0.0), ("fill", nostril, "nostril", 0, _NOSE_Z, 0.0)]
    parts["nose"] = nose
    # The bridge line: on the identity's side when frontal, on the far side when the head turns.
    parts["bridge"] = []
    for s in (-1, 1):
        bridge = _qcurve(
            (0.5 + s * 0.022, idt.eye_y + 0.01),
            (0.5 + s * 0.026, 0.5 * (idt.eye_y + ny) + 0.005),
            (0.5 + s * nwid * 0.7, ny - 0.014),
            7,
        )
        parts["bridge"].append(("line", bridge, "nose_shade", 0.007, _NOSE_Z, 0.0))

    # Wrinkles (shown with age).
    wr = []
    brow_top = idt.eye_y - idt.brow_dy - 0.03
    for k, y in enumerate(np.linspace(idt.hairline_y + 0.035, brow_top, 3)):
        if y - idt.hairline_y < 0.025:
            continue
        hw = 0.10 - 0.015 * k
        line = _qcurve((0.5 - hw, y + 0.006), (0.5, y - 0.004), (0.5 + hw, y + 0.006), 7)
        wr.append(("line", line, "wrinkle", 0.006, 0.0, 0.0))
    for s in (-1, 1):
        ox = 0.5 + s * (idt.eye_dx / 2 + idt.eye_w / 2 + 0.012)
        for dy in (-0.012, 0.0, 0.012):  # crow's feet
            line = np.array([[ox, idt.eye_y + dy * 0.5], [ox + s * 0.022, idt.eye_y + dy * 1.6]])
            wr.append(("line", line, "wrinkle", 0.005, 0.0, 0.0))
        ex = 0.5 + s * idt.eye_dx / 2
        yb = idt.eye_y + idt.eye_w * idt.eye_h * 0.5 + 0.022
        bag = _qcurve((ex - 0.03, yb - 0.006), (ex, yb + 0.004), (ex + 0.03, yb - 0.006), 7)
        wr.append(("line", bag, "wrinkle", 0.005, 0.0, 0.0))
        top = (0.5 + s * (nwid + 0.022), ny - 0.004)
        bot = (0.5 + s * (idt.mouth_w / 2 + 0.026), idt.mouth_y + 0.028)
        wr.append(
            (
                "line",
                _qcurve(top, (0.5 * (top[0] + bot[0]) + s * 0.016, 0.5 * (top[1] + bot[1])), bot, 8),
                "fold",
                0.007,
                0.0,
                0.0,
            )
        )
    parts["wrinkles"] = wr

    parts.update(_hair_parts(idt, g, rng))
    parts["beard"] = _beard_parts(idt, g, rng)
    parts["glasses"] = _glasses_parts(idt, g)
    parts["hat"] = _hat_parts(idt, g)
    for key in parts:
        parts[key] = _normalised(parts[key])
    return g


def _normalised(parts: list) -> list:
    """Parts with float point arrays and per-point protrusion and body weights (drawn as is)."""
    out = []
    for kind, pts, colour, param, prot, body in parts:
        pts = np.ascontiguousarray(pts, dtype=np.float64)
        n = len(pts)
        out.append(
            (
                kind,
                pts,
                colour,
                param,
                np.broadcast_to(np.asarray(prot, float), (n,)).copy(),
                np.broadcast_to(np.asarray(body, float), (n,)).copy(),
            )
        )
    return out


FRINGE_MAX = 0.345  # lowest reach of a fringe (face-local y)
# Half-width of the inner face (attributes._INNER_FACE, which hair never enters) by height.
INNER_FACE_Y = (0.375, 0.44, 0.66, 0.835)
INNER_FACE_HALF_W = (0.14, 0.205, 0.205, 0.12)


def _hair_parts(idt: Identity, g: _Geometry, rng: np.random.Generator) -> dict:
    """Back hair (behind the head) and front hair (over the forehead), with strands."""
    W, H, v, style = idt.head_w, idt.hairline_y, idt.hair_volume, idt.hair_style
    p = idt.part
    back: list = []
    front: list = []

    def hairline(y_end: float, low_side: float = 0.0, bangs: float | None = None) -> np.ndarray:
        """From the left temple (y_end) up over the forehead to the right temple (y_end)."""
        wy = float(_half_width(g, np.array([y_end]))[0])
        if bangs is not None:
            ctrl = [
                (0.5 - wy + 0.04, y_end),
                (0.5 - W + 0.04, bangs + 0.01),
                (0.5 - 0.12, bangs + 0.004),
                (0.5, bangs),
                (0.5 + 0.12, bangs + 0.004),
                (0.5 + W - 0.04, bangs + 0.01),
                (0.5 + wy - 0.04, y_end),
            ]
        else:
            # The fringe never comes below FRINGE_MAX (the hair edit region stops there).
            lo_l = min(H + max(0.0, -p) * low_side + 0.014, FRINGE_MAX)
            lo_r = min(H + max(0.0, p) * low_side + 0.014, FRINGE_MAX)
            temple = 0.5 * (y_end + H) + 0.01
            ctrl = [
                (0.5 - wy + 0.012, y_end),
                (0.5 - W + 0.025, temple),
                (0.5 - 0.13, lo_l),
                (0.5 + 0.05 * p, H - 0.008 * abs(p)),
                (0.5 + 0.13, lo_r),
                (0.5 + W - 0.025, temple),
                (0.5 + wy - 0.012, y_end),
            ]
        return _catmull(ctrl, 4)

    def add_band(outer, inner, n=44, count=14, into=front, along=False):
        poly, o, i = _band(outer, inner, n)
        into.append(("fill", poly, "hair", 0, _HAIR_Z, 0.0))
        for k, strand in enumerate(_strands_along(o, i, rng, count) if along else _strands(o, i, rng, count)):
            into.append(("line", strand, "hair_light" if k % 4 == 3 else "hair_dark", 0.005, _HAIR_Z, 0.0))

    if style in ("short", "buzz", "swept", "bun"):
        y_end = 0.47
        grow = {"short": v, "buzz": 0.006, "swept": v * 1.25 + 0.01, "bun": 0.012}[style]
        outer = _skull(g.outline, y_end, grow)
        inner = hairline(y_end, low_side=0.07 if style == "swept" else 0.0)
        if style == "bun":
            bun = _ellipse(0.5, idt.top_y - 0.035, 0.065, 0.055, 18)
            back.append(("fill", bun, "hair", 0, 0.0, 0.0))
            for k in range(4):
                coil = _ellipse(0.5, idt.top_y - 0.035, 0.05 - 0.01 * k, 0.04 - 0.008 * k, 8, a0=0.3, a1=2.6)
                back.append(("line", coil, "hair_dark", 0.006, 0.0, 0.0))
        add_band(outer, inner, count=8 if style == "buzz" else 14)
        if style == "buzz":
            front[0] = ("fill", front[0][1], "hair_buzz", 0, _HAIR_Z, 0.0)
    elif style in ("bob", "long"):
        bottom = 0.80 if style == "bob" else 1.12
        flare = 0.03 if style == "bob" else 0.07
        top_arc = _skull(g.outline, 0.47, v + 0.012)
        left, r = top_arc[0], top_arc[-1]
        outer = np.concatenate(
            [
                _qcurve((left[0] - flare, bottom), (left[0] - flare * 0.4, 0.5 * (bottom + left[1])), left, 6)[:-1],
                top_arc,
                _qcurve(r, (r[0] + flare * 0.4, 0.5 * (bottom + r[1])), (r[0] + flare, bottom), 6)[1:],
            ]
        )
        back.append(("fill", np.concatenate([outer, [[0.5 + 0.0, bottom + 0.02]]]), "hair_back", 0, 0.0, 0.0))
        ys = np.linspace(0.40, bottom, 10)
        hw = _half_width(g, ys)
        # Inner edge of the side locks: on the face edge, never inside the inner face.
        inner_off = np.where(ys < 0.62, hw - 0.04, np.maximum(hw - 0.02, 0.16 + 0.02 * (ys > 0.95)))
        inner_off = np.where(ys > idt.chin_y - 0.02, np.maximum(inner_off, 0.17), inner_off)
        # ...and at least 0.02 outside the inner face the hair edit leaves untouched.
        inner_off = np.maximum(inner_off, np.interp(ys, INNER_FACE_Y, INNER_FACE_HALF_W) + 0.02)
        left_in = np.stack([0.5 - inner_off, ys], axis=1)[::-1]
        right_in = np.stack([0.5 + inner_off, ys], axis=1)
        if style == "bob":
            crown = hairline(0.40, bangs=FRINGE_MAX - 0.008)[1:-1]
        else:
            crown = hairline(0.40, low_side=0.04)[1:-1]
        inner = np.concatenate([left_in, crown, right_in])
        add_band(outer, inner, n=70, count=16, along=True)
    elif style == "curly":
        outer = _skull(g.outline, 0.60, v + 0.045, bumps=0.016, seed=idt.texture_seed)
        under = [[outer[-1, 0] - 0.03, 0.66], [outer[0, 0] + 0.03, 0.66]]
        back.append(("fill", np.concatenate([outer, under]), "hair_back", 0, 0.0, 0.0))
        inner = hairline(0.60)
        poly, o, i = _band(outer, inner, 60)
        front.append(("fill", poly, "hair", 0, _HAIR_Z, 0.0))
        for k in range(26):  # curls
            j = int(rng.integers(2, 58))
            t = rng.uniform(0.2, 0.75)
            c = o[j] * (1 - t) + i[j] * t
            r = rng.uniform(0.010, 0.016)
            front.append(
                (
                    "line",
                    _ellipse(c[0], c[1], r, r * 0.8, 8, a0=rng.uniform(0, 3), a1=rng.uniform(4, 6)),
                    "hair_dark" if k % 3 else "hair_light",
                    0.006,
                    _HAIR_Z,
                    0.0,
                )
            )
    elif style == "receding":
        for s in (-1, 1):
            ys = np.linspace(0.25, 0.50, 12)
            hw = _half_width(g, ys)
            taper = np.sin(np.linspace(0.15, 1.0, 12) * np.pi) ** 0.6
            outer = np.stack([0.5 + s * (hw + 0.004 + v * 0.5 * taper), ys], axis=1)
            inner = np.stack([0.5 + s * (hw - 0.004 - 0.028 * taper), ys], axis=1)
            add_band(outer, inner, n=16, count=5)
        thin = _skull(g.outline, 0.32, 0.006)
        front.insert(0, ("fill", np.concatenate([thin, [[0.5, H - 0.03]]]), "hair_thin", 0, _HAIR_Z, 0.0))
    return {"hair_back": back, "hair_front": front}


def _beard_parts(idt: Identity, g: _Geometry, rng: np.random.Generator) -> list:
    W, style = idt.head_w, idt.beard_style
    length = {"full": 0.035, "long": 0.085, "short": 0.012}[style]
    y_top = 0.47
    pts = g.outline
    top = int(np.argmin(pts[:, 1]))
    pts = np.roll(pts, -top, axis=0)
    lower = pts[pts[:, 1] >= y_top]
    # Order: right sideburn down to the chin and up the left side (the roll starts at the top and
    # runs clockwise, so the lower part is contiguous).
    c = np.array([0.5, 0.55])
    d = lower - c
    r = np.hypot(d[:, 0], d[:, 1])
    depth = np.clip((lower[:, 1] - 0.62) / (idt.chin_y - 0.62), 0, 1)
    centre = 1 - np.clip(np.abs(lower[:, 0] - 0.5) / W, 0, 1)
    grow = 0.006 + length * depth**1.5 * (0.4 + 0.6 * centre ** (2 if style == "long" else 1))
    grow = grow + rng.uniform(-0.003, 0.003, len(grow))
    outer = c + d * ((r + grow) / r)[:, None]
    mw = idt.mouth_w / 2
    ny = idt.nose_y
    inner_right = [
        (0.5 + W - 0.03, y_top),
        (0.5 + W * 0.84, 0.585),
        (0.5 + mw + 0.04, idt.mouth_y - 0.02),
        (0.5 + mw + 0.005, ny + 0.045),
        (0.5 + idt.nose_w + 0.012, ny + 0.034),
        (0.5, ny + 0.03),
    ]
    # Inner edge from the right sideburn round under the nose to the left one; the outer edge runs
    # from the right sideburn round the chin to the left one.
    inner = _catmull([*inner_right, *[(1 - x, y) for x, y in inner_right[-2::-1]]], 4)
    poly = np.concatenate([outer, inner[::-1]])
    parts = [("fill", poly, "beard", 0, _BEARD_Z, 0.0)]
    # Stubble/strand texture: short strokes inside the beard.
    contour = np.round(poly * 1000).astype(np.int32)
    n = 0
    tries = 0
    while n < 45 and tries < 400:
        tries += 1
        p = np.array([rng.uniform(0.5 - W - 0.02, 0.5 + W + 0.02), rng.uniform(y_top, idt.chin_y + length)])
        if cv2.pointPolygonTest(contour, (float(p[0] * 1000), float(p[1] * 1000)), True) < 8:
            continue
        ang = np.pi / 2 + rng.uniform(-0.5, 0.5) + (p[0] - 0.5) * 1.5
        L = rng.uniform(0.010, 0.018)
        seg = np.array([p, p + L * np.array([np.cos(ang), np.sin(ang)])])
        parts.append(("line", seg, "beard_dark" if n % 3 else "beard_light", 0.0055, _BEARD_Z, 0.0))
        n += 1
    return parts


def _lens(style: str, cx: float, cy: float) -> tuple[np.ndarray, float, float]:
    if style == "round":
        return _ellipse(cx, cy, 0.053, 0.047, 20), 0.053, 0.047
    if style == "rect":
        hx, hy, r = 0.059, 0.037, 0.013
        corners = [
            (cx + hx - r, cy - hy + r, -np.pi / 2, 0),
            (cx + hx - r, cy + hy - r, 0, np.pi / 2),
            (cx - hx + r, cy + hy - r, np.pi / 2, np.pi),
            (cx - hx + r, cy - hy + r, np.pi, 1.5 * np.pi),
        ]
        pts = np.concatenate([_ellipse(x, y, r, r, 4, a0=a0, a1=a1) for x, y, a0, a1 in corners])
        return pts, hx, hy
    # "wide": flat top, rounded bottom (aviator-like)
    top = np.array([[cx - 0.060, cy - 0.036], [cx + 0.060, cy - 0.036]])
    bottom = _catmull(
        [
            (cx + 0.060, cy - 0.036),
            (cx + 0.055, cy + 0.012),
            (cx + 0.02, cy + 0.044),
            (cx - 0.02, cy + 0.044),
            (cx - 0.055, cy + 0.012),
            (cx - 0.060, cy - 0.036),
        ],
        3,
    )
    return np.concatenate([top[:1], bottom[:-1]]), 0.060, 0.044


def _glasses_parts(idt: Identity, g: _Geometry) -> list:
    parts = []
    cy = idt.eye_y + 0.006
    th = 0.017 if idt.glasses_style != "wide" else 0.015
    lenses = []
    for s in (-1, 1):
        cx = 0.5 + s * idt.eye_dx / 2
        poly, hx, hy = _lens(idt.glasses_style, cx, cy)
        lenses.append((cx, poly, hx, hy))
        parts.append(("blend", poly, "lens", 0.28, _GLASSES_Z, 0.0))
        hl = _qcurve((cx - hx * 0.55, cy - hy * 0.35), (cx - hx * 0.25, cy - hy * 0.62), (cx + hx * 0.1, cy - hy * 0.7))
        parts.append(("blendline", hl, "white", (0.008, 0.45), _GLASSES_Z, 0.0))
    for cx, poly, hx, hy in lenses:
        s = 1 if cx > 0.5 else -1
        parts.append(("closed", poly, "frame", th, _GLASSES_Z, 0.0))
        ear_x = 0.5 + s * (float(_half_width(g, np.array([idt.eye_y]))[0]) + 0.004)
        rim = cx + s * hx
        temple = np.array([[rim, cy - hy * 0.55], [0.5 * (rim + ear_x), cy - hy * 0.5], [ear_x, idt.eye_y + 0.004]])
        parts.append(("line", temple, "frame", th * 0.8, np.array([_GLASSES_Z, _GLASSES_Z * 0.5, 0.0]), 0.0))
    (lx, _, lhx, lhy), (rx, _, rhx, _) = lenses
    y = cy - lhy * 0.45
    bridge = _qcurve((lx + lhx * 0.92, y), (0.5, cy - lhy * 0.62 - 0.006), (rx - rhx * 0.92, y), 7)
    parts.append(("line", bridge, "frame", th * 0.85, _GLASSES_Z, 0.0))
    return parts


def _hat_parts(idt: Identity, g: _Geometry) -> list:
    W, v, T, style = idt.head_w, idt.hair_volume, idt.top_y, idt.hat_style
    grow = v + 0.02 if idt.hair_style not in ("curly",) else v + 0.06
    parts = []
    if style in ("beanie", "cap"):
        bottom = 0.32 if style == "beanie" else 0.30
        dome = _skull(g.outline, bottom, grow)
        parts.append(("fill", dome, "hat", 0, _HAT_Z, 0.0))
        if style == "beanie":
            left, r = dome[0], dome[-1]
            top = bottom - 0.07
            cuff = np.concatenate(
                [
                    _qcurve((left[0], bottom), (0.5, bottom + 0.012), (r[0], bottom)),
                    _qcurve((r[0] - 0.004, top), (0.5, top + 0.01), (left[0] + 0.004, top)),
                ]
            )
            parts.append(("fill", cuff, "hat_dark", 0, _HAT_Z, 0.0))
            for x in np.linspace(left[0] + 0.04, r[0] - 0.04, 9):
                rib = np.array([[x, bottom - 0.058], [x, bottom + 0.004]])
                parts.append(("line", rib, "hat_shade", 0.006, _HAT_Z, 0.0))
            parts.append(("fill", _ellipse(0.5, dome[:, 1].min() - 0.012, 0.035, 0.03, 14), "hat_dark", 0, _HAT_Z, 0.0))
        else:
            upper = _qcurve((0.28, bottom - 0.012), (0.5, bottom - 0.022), (0.72, bottom - 0.012))
            lower = _qcurve((0.72, bottom - 0.008), (0.5, bottom + 0.065), (0.28, bottom - 0.008))
            visor = np.concatenate([upper, lower])
            parts.append(("fill", visor, "hat_dark", 0, _HAT_Z + 0.03, 0.0))
            seam = _qcurve((0.5, dome[:, 1].min() + 0.01), (0.51, 0.5 * (bottom + T)), (0.5, bottom - 0.02), 6)
            parts.append(("line", seam, "hat_shade", 0.006, _HAT_Z, 0.0))
            parts.append(("fill", _ellipse(0.5, dome[:, 1].min() + 0.006, 0.012, 0.008, 8), "hat_dark", 0, _HAT_Z, 0.0))
    else:  # fedora
        brim_y = 0.285
        hw = W + grow + 0.005
        brim = _ellipse(0.5, brim_y, hw + 0.10, 0.038, 28)
        crown = _catmull(
            [
                (0.5 - hw, brim_y),
                (0.5 - hw + 0.02, T - 0.01),
                (0.5 - 0.08, T - 0.06),
                (0.5, T - 0.04),
                (0.5 + 0.08, T - 0.06),
                (0.5 + hw - 0.02, T - 0.01),
                (0.5 + hw, brim_y),
            ],
            4,
        )
        band = np.array(
            [
                [0.5 - hw + 0.002, brim_y - 0.045],
                [0.5 + hw - 0.002, brim_y - 0.045],
                [0.5 + hw, brim_y - 0.005],
                [0.5 - hw, brim_y - 0.005],
            ]
        )
        parts += [
            ("fill", brim, "hat_dark", 0, _HAT_Z, 0.0),
            ("fill", crown, "hat", 0, _HAT_Z, 0.0),
            ("fill", band, "hat_band", 0, _HAT_Z, 0.0),
        ]
    return parts


# --- per-render parts (expression) ------------------------------------------------------------------


def _quantised(value: float, step: float) -> float:
    """Expression values are drawn on a fine grid, so their parts can be cached."""
    return round(float(np.clip(value, 0.0, 1.0)) / step) * step


@lru_cache(maxsize=4096)
def _eye_parts(idt: Identity, s: int, open_: float) -> list:
    return _normalised(_eye_parts_uncached(idt, s, open_))


def _eye_parts_uncached(idt: Identity, s: int, open_: float) -> list:
    c = np.array([0.5 + s * idt.eye_dx / 2, idt.eye_y])
    w = idt.eye_w
    h = idt.eye_h * w
    t = idt.eye_tilt
    d = np.array([s * math.cos(t), -math.sin(t)])
    u = s * np.array([d[1], -d[0]])
    inner, outer = c - d * w / 2, c + d * w / 2
    h_up, h_lo = 0.58 * h, 0.42 * h
    o = float(np.clip(open_, 0.0, 1.0))
    up_mid = c - d * w * 0.06 + u * (h_up * o - 0.8 * h_lo * (1 - o))
    lo_mid = c + d * w * 0.04 - u * h_lo
    upper = _qcurve(inner, up_mid, outer, 9)
    lower = _qcurve(inner, lo_mid, outer, 9)
    z = _EYE_Z
    out = []
    r = idt.iris_r * w
    if o > 0.15:
        out.append(("fill", np.concatenate([upper, lower[::-1]]), "sclera", 0, z, 0.0))
        ic = c + u * (h_up - h_lo) * 0.25
        out.append(("fill", _ellipse(ic[0], ic[1], r, r, 16), "iris", 0, z, 0.0))
        out.append(("fill", _ellipse(ic[0], ic[1], r * 0.45, r * 0.45, 10), "pupil", 0, z, 0.0))
        out.append(("fill", _ellipse(ic[0] - r * 0.35, ic[1] - r * 0.4, r * 0.26, r * 0.26, 8), "white", 0, z, 0.0))
        lid_hi = _qcurve(inner - d * 0.004, c - d * w * 0.06 + u * (h_up + r + 0.012), outer + d * 0.004, 9)
        lid_lo = _qcurve(inner - d * 0.004, c + d * w * 0.04 - u * (h_lo + r * 0.6 + 0.01), outer + d * 0.004, 9)
        out.append(("fill", np.concatenate([upper, lid_hi[::-1]]), "skin", 0, z, 0.0))
        out.append(("fill", np.concatenate([lower, lid_lo[::-1]]), "skin", 0, z, 0.0))
        out.append(("line", lower, "lash_lo", 0.005, z, 0.0))
    crease_mid = c - d * w * 0.06 + u * (h_up + 0.016)
    crease = _qcurve(inner + d * 0.006 + u * 0.004, crease_mid, outer - d * 0.002 + u * 0.006, 7)
    out.append(("line", crease, "crease", 0.006, z, 0.0))
    flick = np.array([outer + d * 0.010 + u * 0.004])
    out.append(("line", np.concatenate([upper, flick]), "lash", 0.011, z, 0.0))
    return out


def _mouth_points(idt: Identity, smile: float, open_: float) -> np.ndarray:
    """Mouth corners (left, right) for an expression, face-local."""
    mx = idt.mouth_w / 2 + 0.016 * smile - 0.008 * open_
    y = idt.mouth_y - 0.028 * smile + 0.004 * open_
    return np.array([[0.5 - mx, y], [0.5 + mx, y]])


@lru_cache(maxsize=4096)
def _mouth_parts(idt: Identity, smile: float, open_: float) -> list:
    return _normalised(_mouth_parts_uncached(idt, smile, open_))


def _mouth_parts_uncached(idt: Identity, smile: float, open_: float) -> list:
    s, o = float(np.clip(smile, 0, 1)), float(np.clip(open_, 0, 1))
    L, R = _mouth_points(idt, s, o)
    gap = 0.045 * o + 0.034 * s * (1 - 0.5 * o)
    ub_mid = np.array([0.5, L[1] + 0.003 + 0.030 * s])
    n = 11
    ub = _qcurve(L, ub_mid, R, n)
    lt = _qcurve(L, ub_mid + [0, gap], R, n)
    tt = np.linspace(0, 1, n)[:, None]
    prof = np.sin(np.pi * tt) ** 0.7
    bow = 1 - 0.3 * np.exp(-(((tt - 0.5) / 0.09) ** 2))
    ut = ub - _DOWN * idt.lip_up * prof * bow * (1 - 0.25 * s)
    lb = lt + _DOWN * idt.lip_lo * np.sin(np.pi * tt) ** 0.8 * (1 - 0.2 * s)
    z = _LIP_Z
    out = []
    if gap > 0.003:
        out.append(("fill", np.concatenate([ub, lt[::-1]]), "mouth_in", 0, z, 0.0))
        tooth = min(gap * 0.8, 0.024)
        k = slice(1, n - 1)
        teeth_top = ub[k]
        teeth_bot = teeth_top + _DOWN * tooth * np.sin(np.pi * tt[k]) ** 0.5
        out.append(("fill", np.concatenate([teeth_top, teeth_bot[::-1]]), "teeth", 0, z, 0.0))
    out.append(("fill", np.concatenate([ut, ub[::-1]]), "lip_up", 0, z, 0.0))
    out.append(("fill", np.concatenate([lt, lb[::-1]]), "lip", 0, z, 0.0))
    out.append(("line", ub, "lip_line", 0.0065, z, 0.0))
    mid = n // 2
    out.append(("blendline", lb[mid - 2 : mid + 3] - [0, idt.lip_lo * 0.45], "white", (0.006, 0.25), z, 0.0))
    if s > 0.05:
        for P, sd in ((L, -1), (R, 1)):
            fold = _qcurve(P + [sd * 0.012, -0.026], P + [sd * 0.022, 0.0], P + [sd * 0.011, 0.024], 7)
            out.append(("line", fold, "smile_fold", 0.0075, z, 0.0))
    return out


# --- colours --------------------------------------------------------------------------------------


def hair_rgb(idt: Identity, attributes: Attributes) -> tuple[float, float, float]:
    """Head hair colour: the attribute's named colour or the natural one, greyed with age."""
    base = HAIR_COLOURS[attributes.hair_colour] if attributes.hair_colour else idt.hair
    return _mix(base, (182.0, 182.0, 184.0), _greying(attributes.age) * (0.3 if attributes.hair_colour else 1.0))


def _greying(age: float) -> float:
    return float(np.clip((age - 0.45) / 0.45, 0, 1)) * 0.85


BEARD_CONTRAST = 55.0


@lru_cache(maxsize=4096)
def _palette(idt: Identity, attributes: Attributes) -> dict:
    age = float(attributes.age)
    a = float(np.clip((age - 0.35) / 0.6, 0, 1))
    skin = _mix(idt.skin, _grey(idt.skin), 0.18 * a)
    hair = hair_rgb(idt, attributes)
    natural = _mix(idt.hair, (182.0, 182.0, 184.0), _greying(age))
    lum = sum(natural) / 3
    brow = _scale(natural, 0.72 if lum > 110 else 0.85)
    beard = _scale(natural, 0.85 if lum < 110 else 0.72)
    if idt.beard_style == "short":
        beard = _mix(beard, skin, 0.15)
    # A beard must read against the skin: at least BEARD_CONTRAST darker (brown hair on brown skin).
    skin_l, beard_l = _grey(skin)[0], _grey(beard)[0]
    if abs(beard_l - skin_l) < BEARD_CONTRAST:
        dark = (34.0, 24.0, 18.0)
        target = max(skin_l - BEARD_CONTRAST, _grey(dark)[0])
        beard = _mix(beard, dark, (beard_l - target) / max(beard_l - _grey(dark)[0], 1.0))
    lum_h = sum(hair) / 3
    colours = {
        "skin": skin,
        "ear": _scale(skin, 0.96),
        "ear_line": _scale(skin, 0.74),
        "neck": _scale(skin, 0.80),
        "shirt": idt.shirt,
        "freckle": _scale(skin, 0.76),
        "mole": _scale(skin, 0.42),
        "brow": brow,
        "nose_shade": _mix(skin, _scale(skin, 0.78), 1.0),
        "nose_tip": _scale(skin, 1.0, 9.0),
        "nose_base": _scale(skin, 0.66),
        "nose_wing": _scale(skin, 0.74),
        "nostril": _scale(skin, 0.38),
        "wrinkle": _mix(skin, _scale(skin, 0.72), a),
        "fold": _mix(skin, _scale(skin, 0.80), min(1.0, a * 1.2)),
        "sclera": (238.0, 234.0, 228.0),
        "iris": idt.iris,
        "pupil": (16.0, 12.0, 12.0),
        "white": (255.0, 255.0, 255.0),
        "lash": (34.0, 24.0, 24.0),
        "lash_lo": _scale(skin, 0.70),
        "crease": _scale(skin, 0.80),
        "mouth_in": (78.0, 24.0, 30.0),
        "teeth": (246.0, 242.0, 232.0),
        "lip": idt.lip,
        "lip_up": _scale(idt.lip, 0.88),
        "lip_line": _scale(idt.lip, 0.5),
        "smile_fold": _mix(skin, _scale(skin, 0.74), min(1.0, float(attributes.smile) * 1.3)),
        "hair": hair,
        "hair_back": _scale(hair, 0.82),
        "hair_dark": _scale(hair, 0.8 if lum_h > 60 else 0.62),
        "hair_light": _scale(hair, 1.1, 14.0),
        "hair_buzz": _mix(hair, skin, 0.3),
        "hair_thin": _mix(hair, skin, 0.6),
        "beard": beard,
        "beard_dark": _scale(beard, 0.62),
        "beard_light": _scale(beard, 1.25, 25.0),
        "lens": (214.0, 228.0, 242.0),
        "frame": idt.glasses,
        "hat": idt.hat,
        "hat_dark": _scale(idt.hat, 0.8),
        "hat_shade": _scale(idt.hat, 0.66),
        "hat_band": (30.0, 26.0, 26.0),
    }
    return {k: (int(v[0] + 0.5), int(v[1] + 0.5), int(v[2] + 0.5), 255) for k, v in colours.items()}


# --- assembling and drawing ----------------------------------------------------------------------


def _face_parts(idt: Identity, attributes: Attributes, pose: Pose) -> list:
    g = _geometry(idt)
    p = g.parts
    parts: list = []
    if not (attributes.hat and idt.hair_style == "bun"):
        parts += p["hair_back"]
    parts += p["body"]
    if idt.hair_style not in ("bob", "long", "curly"):
        parts += p["ears"]
    parts += p["head"] + p["marks"]
    if attributes.age > 0.4:
        parts += [x for x in p["wrinkles"] if x[2] == "fold"]
    if attributes.beard:
        parts += p["beard"]
    side = idt.nose_side if abs(pose.yaw) < 4 else (1 if pose.yaw > 0 else -1)
    parts += p["nose"] + [p["bridge"][(side + 1) // 2]]
    eyes_open = _quantised(pose.eyes_open, 0.02)
    parts += _eye_parts(idt, -1, eyes_open) + _eye_parts(idt, 1, eyes_open)
    if attributes.age > 0.4:
        parts += [x for x in p["wrinkles"] if x[2] == "wrinkle"]
    parts += p["brows"]
    parts += _mouth_parts(idt, _quantised(attributes.smile, 0.01), _quantised(pose.mouth_open, 0.02))
    parts += p["hair_front"]
    if attributes.eyeglasses:
        parts += p["glasses"]
    if attributes.hat:
        parts += p["hat"]
    return parts


def _depth(g: _Geometry, pts: np.ndarray) -> np.ndarray:
    hw = np.maximum(_half_width(g, pts[:, 1]), 0.75 * g.prof_w.max()) + 0.03
    xr = (pts[:, 0] - 0.5) / np.maximum(hw, 1e-3)
    vy = np.clip(1 - ((pts[:, 1] - _YC) / 0.52) ** 2, 0, 1)
    return HEAD_DEPTH * np.sqrt(np.clip(1 - xr**2, 0, 1) * vy)


def _placement(pose: Pose, shape: tuple[int, int], roll: bool = True) -> np.ndarray:
    """2x3 taking canonical crop coordinates to image pixels."""
    w, h = shape
    side = pose.scale * min(w, h)
    a = math.radians(pose.roll) if roll else 0.0
    c, s = math.cos(a) * side, math.sin(a) * side
    cx, cy = pose.x * w, pose.y * h
    return np.array([[c, -s, cx - 0.5 * c + 0.5 * s], [s, c, cy - 0.5 * s - 0.5 * c]])


def _compose(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A after B (both 2x3)."""
    return np.concatenate([A[:, :2] @ B[:, :2], (A[:, :2] @ B[:, 2] + A[:, 2])[:, None]], axis=1)


def _warp_local(g: _Geometry, pose: Pose, shape, pts: np.ndarray, prot, body) -> np.ndarray:
    """Face-local points -> image pixels for ``pose`` (see the module docstring)."""
    z = _depth(g, pts) + prot - _PIVOT
    yaw, pitch = math.radians(pose.yaw), math.radians(pose.pitch)
    x = 0.5 + (pts[:, 0] - 0.5) * math.cos(yaw) + z * math.sin(yaw)
    y = _YC + (pts[:, 1] - _YC) * math.cos(pitch) + z * math.sin(pitch)
    head = np.stack([x, y], axis=1) @ (M := _compose(_placement(pose, shape), g.align))[:, :2].T + M[:, 2]
    if np.any(body):
        B = _compose(_placement(pose, shape, roll=False), g.align)
        # Shoulders hang below the neck whatever the roll: pivot the body at the chin, not the crop.
        pivot_local = np.array([[0.5, g.prof_y.max()]])
        shift = (pivot_local @ M[:, :2].T + M[:, 2]) - (pivot_local @ B[:, :2].T + B[:, 2])
        bod = pts @ B[:, :2].T + B[:, 2] + shift
        b = np.asarray(body, float)[:, None]
        return head * (1 - b) + bod * b
    return head


def face_points(
    identity: Identity,
    pose: Pose = NEUTRAL_POSE,
    attributes: Attributes | None = None,
    size: int | tuple[int, int] = 64,
) -> np.ndarray:
    """The five alignment points (CANONICAL order) of a face drawn with ``pose``, image pixels.

    ``attributes`` matters through the smile (it moves the mouth corners); ``size`` is the image
    side or (width, height).
    """
    g = _geometry(identity)
    attributes = attributes or Attributes()
    local = identity.neutral_points()
    local[3:] = _mouth_points(identity, _quantised(attributes.smile, 0.01), _quantised(pose.mouth_open, 0.02))
    prot = np.array([_EYE_Z, _EYE_Z, _NOSE_TIP_Z, _LIP_Z, _LIP_Z])
    return _warp_local(g, pose, _wh(size), local, prot, 0.0)


def face_outline(identity: Identity, pose: Pose = NEUTRAL_POSE, size: int | tuple[int, int] = 64) -> np.ndarray:
    """The (36, 2) face silhouette in mediapipe's FACE_OVAL order (forehead top, clockwise), pixels."""
    g = _geometry(identity)
    return _warp_local(g, pose, _wh(size), g.oval, 0.0, 0.0)


def canonical_warp(identity: Identity, pose: Pose, size: int | tuple[int, int]):
    """A function taking canonical crop points (N, 2) to image pixels through the face's head turn:
    how an edit region (canonical coordinates) lies in a posed image of this face."""
    g = _geometry(identity)
    inv = cv2.invertAffineTransform(g.align)
    shape = _wh(size)

    def warp(pts: np.ndarray) -> np.ndarray:
        local = np.asarray(pts, float) @ inv[:, :2].T + inv[:, 2]
        return _warp_local(g, pose, shape, local, 0.0, 0.0)

    return warp


def _wh(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def supersampling(size_px: float) -> int:
    """Supersampling factor for a face whose crop is ``size_px`` pixels wide."""
    return 4 if size_px <= 96 else 3 if size_px <= 192 else 2


_KIND = {"fill": 0, "line": 1, "closed": 2, "blend": 3, "blendline": 4}


def _draw_faces(frame: np.ndarray, faces, lighting: Lighting) -> np.ndarray:
    """Composite faces (identity, attributes, pose) onto ``frame`` (float32 RGB, lit already)."""
    h, w = frame.shape[:2]
    for idt, attributes, pose in faces:
        g = _geometry(idt)
        parts = _face_parts(idt, attributes, pose)
        pal = _palette(idt, attributes)
        pts = np.concatenate([q[1] for q in parts])
        counts = [len(q[1]) for q in parts]
        prot = np.concatenate([q[4] for q in parts])
        body = np.concatenate([q[5] for q in parts])
        px = _warp_local(g, pose, (w, h), pts, prot, body)
        side = pose.scale * min(w, h) * g.align_scale  # pixels per face-local unit
        ss = supersampling(pose.scale * min(w, h))
        # Region of interest: the face's points, clipped to the frame.
        x0 = int(max(0, math.floor(px[:, 0].min()) - 1))
        y0 = int(max(0, math.floor(px[:, 1].min()) - 1))
        x1 = int(min(w, math.ceil(px[:, 0].max()) + 2))
        y1 = int(min(h, math.ceil(px[:, 1].max()) + 2))
        if x1 <= x0 or y1 <= y0:
            continue
        canvas = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss, 4), np.uint8)
        fixed = np.round(((px - [x0, y0]) * ss + (ss - 1) / 2) * 16).astype(np.int32)
        start = 0
        for (kind, _, colour, param, _, _), n in zip(parts, counts):
            poly = fixed[start : start + n]
            start += n
            col = pal[colour]
            k = _KIND[kind]
            if k == 0:
                cv2.fillPoly(canvas, [poly], col, cv2.LINE_8, 4)
            elif k in (1, 2):
                t = max(1, int(round(param * side * ss)))
                cv2.polylines(canvas, [poly], k == 2, col, t, cv2.LINE_8, 4)
            else:
                thick, alpha = (0, param) if k == 3 else (max(1, int(round(param[0] * side * ss))), param[1])
                bx0, by0 = np.maximum(poly.min(0) // 16 - thick - 1, 0)
                bx1, by1 = poly.max(0) // 16 + thick + 2
                roi = canvas[by0:by1, bx0:bx1]
                if roi.size == 0:
                    continue
                over = roi.copy()
                shifted = poly - np.array([bx0, by0]) * 16
                if k == 3:
                    cv2.fillPoly(over, [shifted], col, cv2.LINE_8, 4)
                else:
                    cv2.polylines(over, [shifted], False, col, thick, cv2.LINE_8, 4)
                cv2.addWeighted(over, alpha, roi, 1 - alpha, 0, dst=roi)
        small = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)
        alpha = small[..., 3:] / 255.0
        shade = _shading(g, idt, pose, (w, h), (x0, y0, x1, y1), lighting)
        roi = frame[y0:y1, x0:x1]
        roi *= 1 - alpha
        roi += small[..., :3] * shade[..., None]
    return frame


def _shading(g: _Geometry, idt: Identity, pose: Pose, shape, box, lighting: Lighting) -> np.ndarray:
    """Multiplicative light on a face: a lit ellipsoid head, rim darkening, a gradient below."""
    x0, y0, x1, y1 = box
    centre_local = np.array([[0.5, 0.5 * (idt.top_y + idt.chin_y)]])
    c = _warp_local(g, pose, shape, centre_local, _PIVOT - _depth(g, centre_local), 0.0)[0]  # moves as the outline
    M = _compose(_placement(pose, shape), g.align)
    scale = float(np.hypot(*M[:, 0]))
    ang = math.atan2(M[1, 0], M[0, 0])
    ax = (idt.head_w + 0.02) * scale
    ay = 0.5 * (idt.chin_y - idt.top_y) * scale + 0.02 * scale
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs - c[0], ys - c[1]
    ca, sa = math.cos(ang), math.sin(ang)
    u = (ca * dx + sa * dy) / ax
    v = (-sa * dx + ca * dy) / ay
    r2 = u * u + v * v
    rn = np.sqrt(np.maximum(r2, 1e-6))
    # A softened sphere on the head (the rim keeps some light), and beyond it normals that lean
    # out less and less (hair volume, neck, shoulders), continuous at the head's edge.
    k = np.clip((rn - 1) / 0.3, 0, 1)
    lean = np.where(rn < 1, np.sqrt(0.8), np.sqrt(0.8) * (1 - k) + 0.55 * k)
    nx = np.where(rn < 1, u * lean, u / rn * lean)
    ny = np.where(rn < 1, v * lean, v / rn * lean)
    nz = np.where(rn < 1, np.sqrt(np.clip(1 - 0.8 * r2, 0, 1)), np.sqrt(0.2) * (1 - k) + 0.83 * k)
    az, el = math.radians(lighting.azimuth - math.degrees(ang)), math.radians(lighting.elevation)
    L = (math.cos(el) * math.cos(az), -math.cos(el) * math.sin(az), math.sin(el))
    diffuse = np.clip(nx * L[0] + ny * L[1] + nz * L[2], 0, 1)
    s = lighting.strength
    return (1 - s) + s * (0.32 + 0.82 * diffuse)


# --- backgrounds and images ---------------------------------------------------------------------


def make_background(seed: int, size: int | tuple[int, int]) -> np.ndarray:
    """A seeded backdrop: a smooth colour field with a few soft shapes (float32 RGB)."""
    w, h = _wh(size)
    rng = np.random.default_rng([0xB6, int(seed)])
    grey = rng.uniform(60, 215)
    base = np.clip(grey + rng.normal(0, 24, 3), 20, 240)
    grid = np.clip(base + rng.normal(0, 20, (3, 3, 3)), 0, 255).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    layer = field.copy()
    for _ in range(int(rng.integers(2, 6))):
        col = tuple(float(c) for c in np.clip(base + rng.normal(0, 30, 3), 0, 255))
        if rng.random() < 0.5:
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.3) * min(w, h)
            cv2.circle(layer, (int(cx * 16), int(cy * 16)), int(r * 16), col, -1, cv2.LINE_AA, 4)
        else:
            x, y = rng.uniform(-0.2, 1.0, 2) * [w, h]
            bw, bh = rng.uniform(0.1, 0.6, 2) * [w, h]
            cv2.rectangle(layer, (int(x), int(y)), (int(x + bw), int(y + bh)), col, -1, cv2.LINE_AA)
    k = max(1.0, 0.012 * min(w, h))
    layer = cv2.GaussianBlur(layer, (0, 0), k)
    return np.clip(0.55 * layer + 0.45 * field, 0, 255).astype(np.float32)


def _background(background, w: int, h: int) -> np.ndarray:
    if background is None:
        return np.full((h, w, 3), (196.0, 202.0, 208.0), np.float32)
    if isinstance(background, (int, np.integer)):
        return make_background(int(background), (w, h))
    arr = np.asarray(background)
    if arr.ndim == 1 and arr.shape[0] == 3:
        return np.broadcast_to(arr.astype(np.float32), (h, w, 3)).copy()
    if arr.shape[:2] != (h, w):
        raise ValueError(f"background is {arr.shape[:2]}, image is {(h, w)}")
    return arr[..., :3].astype(np.float32).copy()


def _finish(frame: np.ndarray, lighting: Lighting) -> np.ndarray:
    gain = np.array([1 + 0.06 * lighting.warmth, 1.0, 1 - 0.08 * lighting.warmth], np.float32) * lighting.brightness
    frame *= gain
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def render_scene(
    faces, size: int | tuple[int, int] = 256, background=None, lighting: Lighting = Lighting()
) -> np.ndarray:
    """An image with ``faces``, a list of (identity, attributes, pose), drawn in order onto
    ``background`` (None: plain grey; an int: :func:`make_background` seed; an RGB triple; an
    (H, W, 3) array). RGB uint8, (height, width, 3)."""
    w, h = _wh(size)
    frame = _background(background, w, h)
    _draw_faces(frame, faces, lighting)
    return _finish(frame, lighting)


def render_face(
    identity: Identity,
    attributes: Attributes | None = None,
    pose: Pose = NEUTRAL_POSE,
    size: int = 64,
    background=None,
    lighting: Lighting = Lighting(),
) -> np.ndarray:
    """One face. With the neutral pose the image is an aligned crop: the five points lie on
    ``CANONICAL_FIVE_POINTS * size`` (see :func:`face_points` for any pose)."""
    return render_scene([(identity, attributes or Attributes(), pose)], size, background, lighting)


# --- occluders ------------------------------------------------------------------------------------

OCCLUDER_KINDS = ("hand", "microphone", "cup", "object")
_HAND_TONES = ((233, 190, 160), (205, 150, 115), (160, 110, 80), (110, 75, 55))
_CUP_COLOURS = ((236, 236, 230), (200, 60, 55), (60, 95, 170), (240, 200, 70))
_BOARD_COLOURS = ((70, 130, 90), (180, 90, 50), (90, 80, 150), (200, 190, 170))


def _chords(cx: float, cy: float, r: float, offsets, vertical: bool) -> list[np.ndarray]:
    """Straight chords of a circle at ``offsets`` from its centre (the grille of a microphone)."""
    out = []
    for d in offsets:
        half = math.sqrt(max(r * r - d * d, 0.0))
        a, b = ((cx + d, cy - half), (cx + d, cy + half)) if vertical else ((cx - half, cy + d), (cx + half, cy + d))
        out.append(np.array([a, b]))
    return out


def occluder_parts(kind: str, variant: int = 0) -> list:
    """An occluder as (kind, points, rgb, thickness) parts in its own units: one unit is the side
    of the aligned crop of the face it covers, the origin its anchor (palm centre, microphone head,
    cup centre, board centre). ``variant`` picks colours. Shapes carry inner lines (creases, a
    grille, stripes) so that they do not look like a flat patch of skin or backdrop."""
    if kind == "hand":
        skin = _HAND_TONES[variant % len(_HAND_TONES)]
        crease = _scale(skin, 0.72)
        fingers = [(-0.105, 0.25, -0.03), (-0.035, 0.29, -0.01), (0.035, 0.28, 0.01), (0.105, 0.22, 0.03)]
        parts = [("fill", _ellipse(0.0, 0.0, 0.155, 0.175, 24), skin, 0.0)]
        for x, length, lean in fingers:
            parts.append(("line", np.array([(x, -0.08), (x + lean, -0.08 - length)]), skin, 0.072))
        parts.append(("line", np.array([(0.12, 0.07), (0.25, -0.07)]), skin, 0.078))
        for x, _, lean in fingers[:3]:  # the dark gaps between fingers
            parts.append(("line", np.array([(x + 0.035, -0.13), (x + 0.035 + lean, -0.20)]), crease, 0.006))
        parts.append(("line", _qcurve((-0.12, 0.02), (0.0, 0.05), (0.11, -0.03), 7), crease, 0.008))
        parts.append(("line", _qcurve((-0.10, -0.05), (0.0, -0.03), (0.12, -0.08), 7), crease, 0.007))
        return parts
    if kind == "microphone":
        metal, dark = (176.0, 178.0, 184.0), (38.0, 38.0, 44.0)
        parts = [
            ("line", np.array([(0.0, 0.05), (0.05, 0.62)]), dark, 0.07),
            ("fill", _ellipse(0.0, 0.0, 0.1, 0.1, 28), metal, 0.0),
            ("line", _ellipse(0.0, 0.06, 0.085, 0.03, 12, a0=0.0, a1=np.pi), (90.0, 92.0, 98.0), 0.02),
        ]
        grille = (-0.06, -0.03, 0.0, 0.03, 0.06)
        for chord in _chords(0.0, 0.0, 0.095, grille, True) + _chords(0.0, 0.0, 0.095, grille, False):
            parts.append(("line", chord, (120.0, 122.0, 128.0), 0.006))
        return parts
    if kind == "cup":
        body = _CUP_COLOURS[variant % len(_CUP_COLOURS)]
        band = _CUP_COLOURS[(variant + 1) % len(_CUP_COLOURS)]
        return [
            ("closed", _ellipse(0.155, 0.0, 0.055, 0.075, 16), body, 0.03),
            ("fill", np.array([(-0.12, -0.14), (0.12, -0.14), (0.095, 0.14), (-0.095, 0.14)]), body, 0.0),
            ("fill", np.array([(-0.111, -0.04), (0.111, -0.04), (0.104, 0.03), (-0.104, 0.03)]), band, 0.0),
            ("line", np.array([(-0.12, -0.14), (0.12, -0.14)]), _scale(body, 0.8), 0.012),
        ]
    if kind == "object":
        board = _BOARD_COLOURS[variant % len(_BOARD_COLOURS)]
        stripe = _scale(board, 0.65, 30)
        w, h = 0.56, 0.8
        parts = [("fill", np.array([(-w, -h), (w, -h), (w, h), (-w, h)]), board, 0.0)]
        for k in range(-4, 5):
            y = 0.17 * k
            parts.append(("line", np.array([(-w + 0.04, y), (w - 0.04, y + 0.05)]), stripe, 0.03 + 0.015 * (k % 2)))
        parts.append(("fill", np.array([(-0.3, -0.62), (0.25, -0.62), (0.25, -0.42), (-0.3, -0.42)]), stripe, 0.0))
        parts.append(("closed", np.array([(-w, -h), (w, -h), (w, h), (-w, h)]), _scale(board, 0.5), 0.03))
        return parts
    raise ValueError(f"unknown occluder {kind!r}: choose from {', '.join(OCCLUDER_KINDS)}")


def draw_occluder(frame: np.ndarray | None, parts: list, M: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Composite ``parts`` (:func:`occluder_parts`) placed by ``M`` (2x3, occluder units -> image
    pixels) onto ``frame`` (float32 RGB, or None for the coverage alone) and return the coverage
    (float32 H x W, 0..1): supersampled hard-edged drawing box-downsampled, as faces are drawn, so
    the coverage is exactly the weight the occluder has in each pixel."""
    w, h = shape
    coverage = np.zeros((h, w), np.float32)
    px = [q[1] @ M[:, :2].T + M[:, 2] for q in parts]
    allpts = np.concatenate(px)
    side = float(np.hypot(*M[:, 0]))
    pad = max(q[3] for q in parts) * side + 2
    x0 = int(max(0, math.floor(allpts[:, 0].min() - pad)))
    y0 = int(max(0, math.floor(allpts[:, 1].min() - pad)))
    x1 = int(min(w, math.ceil(allpts[:, 0].max() + pad)))
    y1 = int(min(h, math.ceil(allpts[:, 1].max() + pad)))
    if x1 <= x0 or y1 <= y0:
        return coverage
    ss = supersampling(side)
    canvas = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss, 4), np.uint8)
    for (kind, _, rgb, thick), pts in zip(parts, px):
        poly = np.round(((pts - [x0, y0]) * ss + (ss - 1) / 2) * 16).astype(np.int32)
        col = (*(float(c) for c in rgb), 255.0)
        if kind == "fill":
            cv2.fillPoly(canvas, [poly], col, cv2.LINE_8, 4)
        else:
            t = max(1, int(round(thick * side * ss)))
            cv2.polylines(canvas, [poly], kind == "closed", col, t, cv2.LINE_8, 4)
    small = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)
    alpha = small[..., 3] / 255.0
    coverage[y0:y1, x0:x1] = alpha
    if frame is not None:
        roi = frame[y0:y1, x0:x1]
        roi *= 1 - alpha[..., None]
        roi += small[..., :3]  # the box average of hard-edged colour is already weighted by coverage
    return coverage
