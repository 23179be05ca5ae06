"""FaceWorld scene videos with ground-truth face tracks, and the aligned training set.

A :class:`Clip` is a *description* (identities, attributes, seed, length, size, rate): frames are
drawn on demand. All motion (drift, head turns, nods, roll, zoom, blinks, talking) and the
lighting drift and backdrop are functions of time drawn from the seed alone (and the number of
faces), never from the identities or attributes. So

* ``clip.with_attributes(new)`` is the very same video edited: same motion, light and backdrop,
  pixels differ only inside the regions of the changed attributes;
* ``clip.with_identities(ids)`` is the same performance by other people;
* a longer clip with the same seed starts with the shorter one's frames.

``clip.tracks`` are the ground-truth :class:`ipfacediff.face.FaceTracks` (track id = face index):
the five points the renderer placed, boxes derived from them by the project's own convention
(``CANONICAL_FACE_BOX`` through the weighted alignment fit), and the face silhouette as outline.
A smile moves the mouth corners, so a smile edit moves those two points (and the box a little);
every other edit leaves the tracks unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from ipfacediff.face import (
    ALIGNMENT_WEIGHTS,
    CANONICAL_FIVE_POINTS,
    FaceTrack,
    FaceTracks,
    box_from_points,
    similarity_transform,
)
from faceworld.attributes import Attributes, Edit, caption, region_mask
from faceworld.identity import HAIR_COLOURS, identity, split_ids
from faceworld.render import (
    OCCLUDER_KINDS,
    Lighting,
    Pose,
    _draw_faces,
    _finish,
    _placement,
    canonical_warp,
    draw_occluder,
    face_outline,
    face_points,
    make_background,
    occluder_parts,
    render_scene,
)

# --- motion ---------------------------------------------------------------------------------------

_BLINK_HALF = 0.07  # seconds from half-closed to shut
_MAX_BLINKS = 64


def _wave(rng: np.random.Generator, amp: float, f_lo: float, f_hi: float, terms: int = 2):
    """A smooth random function of time: a sum of sines (returns amplitudes, freqs, phases)."""
    a = rng.uniform(0.4, 1.0, terms)
    a *= amp / a.sum()
    return a, rng.uniform(f_lo, f_hi, terms), rng.uniform(0, 2 * np.pi, terms)


def _at(w, t: float) -> float:
    a, f, p = w
    return float(np.sum(a * np.sin(2 * np.pi * f * t + p)))


@dataclass(frozen=True)
class Motion:
    """One face's performance: smooth random functions of time, drawn from a seed."""

    base: tuple[float, float, float]  # x, y, scale
    drift_x: tuple
    drift_y: tuple
    zoom: tuple
    yaw: tuple
    yaw_bias: float
    pitch: tuple
    roll: tuple
    blinks: tuple[float, ...]
    talk_phase: tuple
    talk_gate: tuple
    talk_bias: float

    @classmethod
    def sample(cls, seed: int, face: int, faces: int) -> Motion:
        rng = np.random.default_rng([0x40710, int(seed), int(face), int(faces)])
        if faces == 1:
            base = (0.5 + rng.uniform(-0.06, 0.06), 0.47 + rng.uniform(-0.03, 0.03), rng.uniform(0.52, 0.64))
            drift = 0.05
        else:
            x = (0.28 if face == 0 else 0.72) + rng.uniform(-0.02, 0.02)
            base = (x, 0.46 + rng.uniform(-0.04, 0.04), rng.uniform(0.38, 0.44))
            drift = 0.03
        blinks, t = [], rng.uniform(0.2, 2.5)
        for _ in range(_MAX_BLINKS):
            blinks.append(t)
            t += rng.uniform(1.5, 5.0)
        return cls(
            base=base,
            drift_x=_wave(rng, drift, 0.05, 0.25),
            drift_y=_wave(rng, drift * 0.6, 0.05, 0.25),
            zoom=_wave(rng, 0.06, 0.05, 0.2),
            yaw=_wave(rng, rng.uniform(15, 30), 0.08, 0.3),
            yaw_bias=rng.uniform(-8, 8),
            pitch=_wave(rng, rng.uniform(4, 10), 0.15, 0.5),
            roll=_wave(rng, rng.uniform(2, 7), 0.05, 0.25),
            blinks=tuple(blinks),
            talk_phase=_wave(rng, 1.0, 1.6, 3.2, terms=3),
            talk_gate=_wave(rng, 1.0, 0.08, 0.25),
            talk_bias=rng.uniform(-0.4, 0.5),
        )

    def pose(self, t: float) -> Pose:
        x, y, scale = self.base
        blink = max((0.0, *(1 - abs(t - b) / _BLINK_HALF / 2 for b in self.blinks if abs(t - b) < 2 * _BLINK_HALF)))
        talking = _at(self.talk_gate, t) + self.talk_bias > 0
        mouth = float(np.clip(0.45 + 0.6 * _at(self.talk_phase, t), 0, 1)) if talking else 0.0
        return Pose(
            x=x + _at(self.drift_x, t),
            y=y + _at(self.drift_y, t),
            scale=scale * (1 + _at(self.zoom, t)),
            roll=_at(self.roll, t),
            yaw=self.yaw_bias + _at(self.yaw, t),
            pitch=_at(self.pitch, t),
            eyes_open=float(np.clip(1 - 1.6 * blink, 0, 1)),
            mouth_open=mouth,
        )


@dataclass(frozen=True)
class LightDrift:
    """The scene light over time."""

    azimuth: tuple
    azimuth_base: float
    elevation: float
    strength: float
    brightness: tuple
    warmth: float

    @classmethod
    def sample(cls, seed: int) -> LightDrift:
        rng = np.random.default_rng([0x11647, int(seed)])
        return cls(
            _wave(rng, 30, 0.03, 0.12),
            rng.uniform(0, 360),
            rng.uniform(45, 70),
            rng.uniform(0.25, 0.45),
            _wave(rng, 0.08, 0.05, 0.2),
            rng.uniform(-0.4, 0.4),
        )

    def at(self, t: float) -> Lighting:
        return Lighting(
            self.azimuth_base + _at(self.azimuth, t),
            self.elevation,
            self.strength,
            1.0 + _at(self.brightness, t),
            self.warmth,
        )


# --- occluders -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Occluder:
    """Something held or passing in front of face ``face``: a hand passing across the eyes and
    nose, a microphone held at the mouth, a cup raised to the mouth and lowered, or a board
    ("object") passing across the whole face, which hides it completely for a few frames in the
    middle of the clip. Its path is a function of the clip's progress (so any length of clip
    shows the whole pass) and of the face's placement, never of the attributes: an edited clip
    has the very same occluder in front of it."""

    kind: str
    face: int = 0
    variant: int = 0  # colours

    def __post_init__(self) -> None:
        if self.kind not in OCCLUDER_KINDS:
            raise ValueError(f"unknown occluder {self.kind!r}: choose from {', '.join(OCCLUDER_KINDS)}")

    def anchor(self, u: float) -> tuple[float, float]:
        """Where the occluder's origin is at progress ``u`` (0 = first frame, 1 = last), in the
        face's aligned-crop coordinates (the eyes near y 0.47, the mouth near 0.72)."""
        wobble = math.sin(2 * math.pi * 1.5 * u)
        if self.kind == "hand":  # across, fingers up over the eyes, palm over the nose
            return 0.5 - 0.64 + 1.28 * u, 0.6 + 0.015 * wobble
        if self.kind == "microphone":  # held at the mouth and chin the whole time
            return 0.52 + 0.02 * wobble, 0.8 + 0.015 * math.cos(2 * math.pi * u)
        if self.kind == "cup":  # raised from below to the mouth and lowered again
            return 0.53, 0.79 + 0.75 * (1 - math.sin(math.pi * u))
        return 0.5 - 1.25 + 2.5 * u, 0.55  # object: a board passing across the whole face

    def draw(self, canvas: np.ndarray | None, crop_to_frame: np.ndarray, u: float, size: tuple[int, int]) -> np.ndarray:
        """Draw it at progress ``u`` in front of the face whose aligned crop (side 1) maps to the
        frame by ``crop_to_frame`` (2x3); returns its coverage (see :func:`draw_occluder`)."""
        place = np.array(crop_to_frame, np.float64)
        place[:, 2] += place[:, :2] @ self.anchor(u)
        return draw_occluder(canvas, occluder_parts(self.kind, self.variant), place, size)


def occlude_frames(
    frames: Sequence[np.ndarray], crop_to_frame: dict[int, np.ndarray], occluders: Sequence[Occluder | str]
) -> tuple[np.ndarray, np.ndarray]:
    """Any video (a real clip, say) with FaceWorld occluders composited in front of one face:
    ``crop_to_frame`` maps each frame index to the 2x3 taking that face's aligned crop (side 1) to
    the frame (the inverse of ``alignment_transforms(track, 1)``); frames without one are left as
    they are. Returns the frames (uint8) and the true coverage (float32, frames x H x W, 0..1)."""
    kinds = [o if isinstance(o, Occluder) else Occluder(o) for o in occluders]
    out, masks = [], []
    for i, frame in enumerate(frames):
        h, w = frame.shape[:2]
        canvas = frame.astype(np.float32)
        coverage = np.zeros((h, w), np.float32)
        if i in crop_to_frame:
            u = i / (len(frames) - 1) if len(frames) > 1 else 0.5
            for occluder in kinds:
                drawn = occluder.draw(canvas, crop_to_frame[i], u, (w, h))
                coverage += drawn * (1 - coverage)
        out.append(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
        masks.append(coverage)
    return np.stack(out), np.stack(masks)


# --- clips ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """A FaceWorld scene video (see the module docstring). Iterate it for RGB uint8 frames."""

    identity_ids: tuple[int, ...]
    attributes: tuple[Attributes, ...]
    seed: int = 0
    frames: int = 24
    size: tuple[int, int] = (256, 256)  # width, height
    fps: float = 12.0
    occluders: tuple[Occluder, ...] = ()  # drawn in front of every face, in order

    def __post_init__(self) -> None:
        if not 1 <= len(self.identity_ids) <= 2:
            raise ValueError("a clip has one or two faces")
        if len(self.attributes) != len(self.identity_ids):
            raise ValueError("give one Attributes per face")
        if any(not 0 <= o.face < len(self.identity_ids) for o in self.occluders):
            raise ValueError("an occluder covers a face of the clip")

    # -- variants --
    def with_attributes(self, attributes: Attributes | Sequence[Attributes]) -> Clip:
        """The same video (motion, light, backdrop) with other attributes: the edit's ground truth."""
        return replace(self, attributes=_per_face(attributes, len(self.identity_ids)))

    def with_edit(self, edit: Edit, face: int | None = None) -> Clip:
        """The same video with ``edit`` applied to one face (or to all when ``face`` is None)."""
        attrs = tuple(edit.apply(a) if face is None or k == face else a for k, a in enumerate(self.attributes))
        return self.with_attributes(attrs)

    def with_identities(self, identity_ids: Sequence[int]) -> Clip:
        """The same performance by other people (as many as before)."""
        ids = tuple(int(i) for i in identity_ids)
        if len(ids) != len(self.identity_ids):
            raise ValueError("with_identities keeps the number of faces")
        return replace(self, identity_ids=ids)

    def with_occluders(self, occluders: Sequence[Occluder | str]) -> Clip:
        """The same video with these occluders in front (kinds alone cover face 0); ``()`` takes
        them away, which gives the unoccluded clip behind them."""
        return replace(self, occluders=tuple(o if isinstance(o, Occluder) else Occluder(o) for o in occluders))

    # -- ground truth --
    @cached_property
    def motions(self) -> tuple[Motion, ...]:
        return tuple(Motion.sample(self.seed, k, len(self.identity_ids)) for k in range(len(self.identity_ids)))

    @cached_property
    def light(self) -> LightDrift:
        return LightDrift.sample(self.seed)

    @cached_property
    def background(self) -> np.ndarray:
        """The backdrop (float32 RGB), the same for every frame."""
        bg = make_background(self.seed, self.size)
        bg.setflags(write=False)
        return bg

    def pose(self, face: int, frame: int) -> Pose:
        return self.motions[face].pose(frame / self.fps)

    def lighting(self, frame: int) -> Lighting:
        return self.light.at(frame / self.fps)

    def faces(self, frame: int) -> list:
        """(identity, attributes, pose) of each face in ``frame``, in drawing order."""
        people = zip(self.identity_ids, self.attributes)
        return [(identity(i), a, self.pose(k, frame)) for k, (i, a) in enumerate(people)]

    def points(self, face: int, frame: int) -> np.ndarray:
        i, a, p = self.faces(frame)[face]
        return face_points(i, p, a, self.size)

    @property
    def tracks(self) -> FaceTracks:
        tracks = []
        for k in range(len(self.identity_ids)):
            points, boxes, outlines = [], [], []
            for f in range(self.frames):
                idt, attrs, pose = self.faces(f)[k]
                p = face_points(idt, pose, attrs, self.size)
                points.append(p)
                boxes.append(box_from_points(p))
                outlines.append(face_outline(idt, pose, self.size))
            tracks.append(FaceTrack(k, list(range(self.frames)), boxes, points, outlines))
        w, h = self.size
        return FaceTracks(self.frames, w, h, float(self.fps), tracks)

    def edit_mask(self, edit: Edit, frame: int, face: int | None = None, *, dilate_px: float = 0.0) -> np.ndarray:
        """Where ``edit`` may change ``frame`` (bool, H x W): its region on ``face`` (all faces
        when None), bent by each face's pose."""
        w, h = self.size
        mask = np.zeros((h, w), bool)
        for k, (idt, _, pose) in enumerate(self.faces(frame)):
            if face is None or k == face:
                mask |= region_mask(edit.region, None, (w, h), dilate_px, warp=canonical_warp(idt, pose, self.size))
        return mask

    # -- occluders --
    def _draw_occluders(self, canvas: np.ndarray | None, index: int) -> np.ndarray:
        w, h = self.size
        coverage = np.zeros((h, w), np.float32)
        u = index / (self.frames - 1) if self.frames > 1 else 0.5
        for occluder in self.occluders:
            drawn = occluder.draw(
                canvas, _placement(self.pose(occluder.face, index), self.size, roll=False), u, self.size
            )
            coverage += drawn * (1 - coverage)
        return coverage

    def occluder_mask(self, index: int) -> np.ndarray:
        """How much of each pixel of frame ``index`` the occluders cover (float32 H x W, 0..1; 1
        where the pixel is the occluder alone): the ground truth of an occlusion mask."""
        if not 0 <= index < self.frames:
            raise IndexError(index)
        return self._draw_occluders(None, index)

    def occluder_masks(self) -> np.ndarray:
        """Every frame's :meth:`occluder_mask` as (frames, H, W) uint8 coverage, 0..255 (the
        saved ground truth)."""
        return np.stack([np.round(self.occluder_mask(i) * 255).astype(np.uint8) for i in range(self.frames)])

    def face_coverage(self, face: int, index: int) -> float:
        """The share of face ``face``'s silhouette (forehead to chin) the occluders hide in frame
        ``index``: 0 unoccluded, 1 fully covered."""
        idt, _, pose = self.faces(index)[face]
        w, h = self.size
        inside = np.zeros((h, w), np.uint8)
        cv2.fillPoly(inside, [np.round(face_outline(idt, pose, self.size) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        area = inside.sum()
        return float((self.occluder_mask(index) * inside).sum() / area) if area else 0.0

    # -- frames --
    def frame(self, index: int) -> np.ndarray:
        if not 0 <= index < self.frames:
            raise IndexError(index)
        lighting = self.lighting(index)
        canvas = self.background.copy()
        _draw_faces(canvas, self.faces(index), lighting)
        self._draw_occluders(canvas, index)
        return _finish(canvas, lighting)

    def __len__(self) -> int:
        return self.frames

    def __getitem__(self, index: int) -> np.ndarray:
        return self.frame(index if index >= 0 else self.frames + index)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.frame(i) for i in range(self.frames))

    def array(self) -> np.ndarray:
        """All frames, (frames, H, W, 3) uint8."""
        return np.stack(list(self))

    def caption(self, face: int = 0) -> str:
        return caption(self.attributes[face])


def _per_face(attributes, n: int) -> tuple[Attributes, ...]:
    if attributes is None:
        return (Attributes(),) * n
    if isinstance(attributes, Attributes):
        return (attributes,) * n
    attrs = tuple(attributes)
    if len(attrs) != n or not all(isinstance(a, Attributes) for a in attrs):
        raise ValueError(f"give one Attributes per face ({n})")
    return attrs


def render_clip(
    identity_ids: int | Sequence[int],
    attributes_per_face: Attributes | Sequence[Attributes] | None = None,
    seed: int = 0,
    frames: int = 24,
    size: int | tuple[int, int] = 256,
    fps: float = 12.0,
    occluders: Sequence[Occluder | str] = (),
) -> Clip:
    """A scene video of one or two moving faces (see :class:`Clip`; frames are drawn lazily),
    with ``occluders`` (kinds of :data:`OCCLUDER_KINDS` or :class:`Occluder`) in front."""
    ids = (int(identity_ids),) if np.isscalar(identity_ids) else tuple(int(i) for i in identity_ids)
    wh = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    clip = Clip(ids, _per_face(attributes_per_face, len(ids)), int(seed), int(frames), wh, float(fps))
    return clip.with_occluders(occluders) if occluders else clip


DEMO_IDENTITY = 1007  # held out: never rendered for training (ids >= 1000)


def demo_clip(frames: int = 24) -> Clip:
    """The clip ``ipfacediff demo`` edits (an ``ipfacediff.demo_clips`` entry point): a held-out
    person moving, turning, blinking and talking."""
    return render_clip(DEMO_IDENTITY, seed=3, frames=frames, size=256, fps=12.0)


def write_clip(
    clip: Clip,
    path_mp4: str | os.PathLike,
    tracks_json: str | os.PathLike | None = None,
    occluder_npz: str | os.PathLike | None = None,
) -> tuple[Path, Path | None]:
    """Write the video (H.264 via :func:`ipfacediff.video.write_video`) and, when asked, its
    ground-truth tracks (:meth:`FaceTracks.save`) and occluder masks (:func:`save_occluder_masks`)."""
    from ipfacediff.video import write_video

    video = write_video(path_mp4, iter(clip), clip.fps)
    tracks = clip.tracks.save(tracks_json) if tracks_json is not None else None
    if occluder_npz is not None:
        save_occluder_masks(clip, occluder_npz)
    return video, tracks


def save_occluder_masks(clip: Clip, path: str | os.PathLike) -> Path:
    """The occluders' ground truth, written atomically as an npz: ``masks`` (frames, H, W) uint8
    coverage 0..255 (:meth:`Clip.occluder_masks`), ``face_coverage`` (faces, frames) float32 (the
    share of each face hidden, :meth:`Clip.face_coverage`) and ``kinds``. The video's pixels are
    ``mask/255 * occluder + (1 - mask/255) * scene``; the truth of an edit behind the occluder is
    the edited clip (:meth:`Clip.with_edit`), which keeps it."""
    import io

    from ipfacediff.files import write_atomic

    coverage = [[clip.face_coverage(k, i) for i in range(clip.frames)] for k in range(len(clip.identity_ids))]
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        masks=clip.occluder_masks(),
        face_coverage=np.asarray(coverage, np.float32),
        kinds=np.array([o.kind for o in clip.occluders], dtype=str),
    )
    return write_atomic(Path(path), buffer.getvalue())


def load_occluder_masks(path: str | os.PathLike) -> np.ndarray:
    """The ``masks`` of a :func:`save_occluder_masks` file as float32 coverage, 0..1."""
    with np.load(path) as data:
        return data["masks"].astype(np.float32) / 255.0


# --- aligned training images ------------------------------------------------------------------------


def align_pose(identity_, pose: Pose, size: int = 64, attributes: Attributes | None = None) -> Pose:
    """``pose`` re-placed so that its image is an aligned crop by the project's convention: the
    weighted similarity fit of its five points (with ``attributes``' expression; neutral when
    None, so a smile edit keeps the crop) lands on ``CANONICAL_FIVE_POINTS * size``."""
    start = pose.replace(x=0.5, y=0.5, scale=1.0, roll=0.0)
    pts = face_points(identity_, start.replace(mouth_open=0.0) if attributes is None else start, attributes, size)
    S = similarity_transform(pts, CANONICAL_FIVE_POINTS * size, ALIGNMENT_WEIGHTS)
    k = float(np.hypot(S[0, 0], S[1, 0]))
    theta = math.atan2(S[1, 0], S[0, 0])
    centre = S[:, :2] @ np.array([0.5 * size, 0.5 * size]) + S[:, 2]
    return pose.replace(x=float(centre[0] / size), y=float(centre[1] / size), scale=k, roll=math.degrees(theta))


def random_attributes(rng: np.random.Generator) -> Attributes:
    """Training-set attributes: each edit's attribute on in roughly a third of the images."""
    r = rng.random(7)
    names = sorted(HAIR_COLOURS)
    hair = None if r[1] < 0.55 else ("blonde" if r[1] < 0.72 else names[int(rng.integers(len(names)))])
    smile = 0.0 if r[3] < 0.5 else 1.0 if r[3] < 0.8 else float(rng.uniform(0.1, 0.9))
    return Attributes(
        eyeglasses=bool(r[0] < 0.3),
        hair_colour=hair,
        beard=bool(r[2] < 0.28),
        smile=smile,
        age=float(np.clip(rng.beta(2.0, 3.0), 0, 1)),
        hat=bool(r[4] < 0.1),
    )


class DatasetItem(NamedTuple):
    """Everything that fixes one training image; ``render`` it with other attributes for the
    ground truth of an edit (same person, pose, light, backdrop and crop)."""

    identity_id: int
    attributes: Attributes
    pose: Pose  # aligned placement (plus the residual jitter), any image size
    lighting: Lighting
    background: int

    def render(self, size: int = 64, attributes: Attributes | None = None) -> np.ndarray:
        idt = identity(self.identity_id)
        return render_scene([(idt, attributes or self.attributes, self.pose)], size, self.background, self.lighting)

    def edit_mask(self, edit: Edit, size: int = 64, *, dilate_px: float = 0.0) -> np.ndarray:
        """``edit``'s region in this image, bent by its head turn (bool, size x size)."""
        warp = canonical_warp(identity(self.identity_id), self.pose, size)
        return region_mask(edit.region, None, (size, size), dilate_px, warp=warp)


def misaligned(aligned: Pose, noise: np.ndarray, *, shift: float, degrees: float, zoom: float) -> Pose:
    """``aligned`` with the residual misalignment a real detector leaves: a small similarity about
    the crop centre, from four standard-normal draws scaled to a shift (crop sides), a rotation
    (degrees) and a zoom."""
    tx, ty = float(noise[0] * shift), float(noise[1] * shift)
    rot, scale = float(noise[2] * degrees), float(1 + noise[3] * zoom)
    c, s = math.cos(math.radians(rot)) * scale, math.sin(math.radians(rot)) * scale
    dx, dy = aligned.x - 0.5, aligned.y - 0.5
    return aligned.replace(
        x=0.5 + c * dx - s * dy + tx, y=0.5 + s * dx + c * dy + ty, roll=aligned.roll + rot, scale=aligned.scale * scale
    )


def dataset_item(split: str, index: int, seed: int = 0) -> DatasetItem:
    """The ``index``-th item of ``dataset(split, ..., seed=seed)``."""
    ids = split_ids(split)
    rng = np.random.default_rng([0xDA7A, int(seed), int(index), 0 if split == "train" else 1])
    idt_id = int(ids[int(rng.integers(len(ids)))])
    attrs = random_attributes(rng)
    j = rng.normal(0, 1, 6)
    pose = Pose(
        yaw=float(np.clip(j[0] * 7, -18, 18)),
        pitch=float(np.clip(j[1] * 4, -10, 10)),
        eyes_open=1.0 if rng.random() < 0.93 else float(rng.uniform(0, 1)),
        mouth_open=0.0 if rng.random() < 0.8 else float(rng.uniform(0, 0.6)),
    )
    light = Lighting(
        float(rng.uniform(0, 360)),
        float(rng.uniform(40, 80)),
        float(rng.uniform(0.12, 0.5)),
        float(rng.uniform(0.85, 1.15)),
        float(rng.uniform(-0.5, 0.5)),
    )
    final = misaligned(align_pose(identity(idt_id), pose), j[2:6], shift=0.008, degrees=1.5, zoom=0.02)
    return DatasetItem(idt_id, attrs, final, light, int(rng.integers(0, 2**31 - 1)))


class Sample(NamedTuple):
    image: np.ndarray  # (size, size, 3) uint8, an aligned crop
    identity_id: int
    attributes: Attributes
    caption: str


def dataset(split: str, count: int, size: int = 64, seed: int = 0) -> Iterator[Sample]:
    """``count`` aligned training images of identities from ``split`` ("train": ids < 1000;
    "held_out": ids >= 1000), random attributes, mild pose, light and alignment jitter, random
    backdrops. Item ``i`` depends on (split, seed, i) only."""
    for i in range(int(count)):
        item = dataset_item(split, i, seed)
        yield Sample(item.render(size), item.identity_id, item.attributes, caption(item.attributes))
