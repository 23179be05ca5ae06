"""Faces in the wild: detection, tracking, alignment, masks and paste-back.

The editing model works on aligned, fixed-size face crops. This module finds the faces of a video
(mediapipe's detector, then its face mesh at full resolution), links them into tracks with stable
ids, turns each frame's five alignment points into a temporally smoothed similarity transform, cuts
the crop, and pastes an edited crop back with a feathered face mask and colour matching at the seam.

mediapipe and the video reader are imported where they are used, so that modules that only need
:data:`CANONICAL_FIVE_POINTS` (the identity network) do not load them.
"""

from __future__ import annotations

import json
import math
import os
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from ipfacediff.errors import UserError
from ipfacediff.files import write_atomic

if TYPE_CHECKING:
    from ipfacediff.models.segmenter import OccluderSegmenter

# Canonical FFHQ-like positions of the five alignment points (left eye centre, right eye centre,
# nose tip, left mouth corner, right mouth corner) in a crop of side 1.0, "left" meaning image left.
# Every aligned crop in the project (diffusion input, identity networks, FaceWorld) uses them.
CANONICAL_FIVE_POINTS = np.array(
    [
        [0.37692, 0.46865],
        [0.62286, 0.46913],
        [0.50124, 0.61332],
        [0.39309, 0.72541],
        [0.61150, 0.72490],
    ],
    dtype=np.float64,
)

# The face box (x0, y0, x1, y1) in canonical crop coordinates. Boxes are always derived from the
# five points through it, so every box in a track file has one convention whether the points came
# from the mesh, the detector or interpolation, and a box alone gives back plausible points.
# Measured: mediapipe's detector box on a frontal face, mapped into the aligned crop.
CANONICAL_FACE_BOX = (0.20, 0.30, 0.80, 0.90)

# The face ellipse (centre x, centre y, half-width, half-height) in canonical crop coordinates: the
# mask when a frame has no mesh outline (detector-only frames, track files without outlines).
# Measured: the extent of the mesh silhouette of a frontal face in the aligned crop.
CANONICAL_FACE_ELLIPSE = (0.50, 0.62, 0.28, 0.30)

# The inner face (brows, eyes, nose, mouth) in canonical crop coordinates: what a hair edit must
# leave alone. The five points' hull grown to take in the brows above the eyes, the eye corners and
# the lips of a broad smile; it stays inside the hairline and the side locks of any frontal face.
CANONICAL_INNER_FACE = np.array(
    [[0.29, 0.37], [0.71, 0.37], [0.71, 0.64], [0.64, 0.80], [0.36, 0.80], [0.29, 0.64]], dtype=np.float64
)

# Weights of the five points in the alignment fit. The eyes weigh most: mouth corners move with
# expression and the nose tip with head pitch, and letting them pull the fit as much as the eyes
# moves the whole crop when the subject smiles (on closeup.mp4 the eyes' spread in the 512 px crop
# drops from 1.9 to 1.0 px with these weights, before smoothing).
ALIGNMENT_WEIGHTS = np.array([4.0, 4.0, 2.0, 1.0, 1.0])

# Face-mesh landmark indices. "Left" is image left, i.e. the subject's right side.
_MESH_EYE_CORNERS = ((33, 133), (362, 263))
_MESH_NOSE_TIP = 1
_MESH_MOUTH_CORNERS = (61, 291)
# The face silhouette, in order around the face (mediapipe's FACEMESH_FACE_OVAL as a polygon).
_MESH_FACE_OVAL = (
    10,
    338,
    297,
    332,
    284,
    251,
    389,
    356,
    454,
    323,
    361,
    288,
    397,
    365,
    379,
    378,
    400,
    377,
    152,
    148,
    176,
    149,
    150,
    136,
    172,
    58,
    132,
    93,
    234,
    127,
    162,
    21,
    54,
    103,
    67,
    109,
)
_MESH_INDICES = np.array(
    [*_MESH_EYE_CORNERS[0], *_MESH_EYE_CORNERS[1], _MESH_NOSE_TIP, *_MESH_MOUTH_CORNERS, *_MESH_FACE_OVAL]
)

# Detection runs on a copy whose long side is at most this (mediapipe's detector looks at 192 px
# anyway); landmarks always come from the full-resolution frame.
DETECT_MAX_SIDE = 1280
# Smallest detection tile, in pixels of that copy: finer tiles cost more calls than they find faces.
DETECT_MIN_TILE = 320
# Tile detections per frame: tiles are visited round-robin so large frames cost a bounded time per
# frame; a face once found is followed by the face mesh whatever its size.
DETECT_TILES_PER_FRAME = 2
# The face mesh runs on a square this many times the face box, resized to at most MESH_MAX_SIDE.
MESH_CONTEXT = 2.0
MESH_MAX_SIDE = 512
# No face, no paint: a frame where a track gets no landmarks is bridged (interpolated, so edited)
# only on the frame's own evidence of a face where the track predicts it, else it stays out of the
# track and passes through unedited. Evidence is either of:
# - the detector, run again on the mesh's context square of the predicted box at full resolution
#   (the face about half its input, where the per-frame pass saw the whole frame downscaled),
#   finds a face whose box has at least BRIDGE_MIN_IOU with the prediction. Its threshold stays
#   mediapipe's 0.5: lower settings find nothing more (its graphs report no face under about 0.6
#   whatever the setting, measured on ever more blurred faces: 0.69, 0.63, then none). The
#   full-range model, as per frame: on squares of jogger.mp4 away from the face the short-range one
#   also fires on the body (IoU up to 0.62 with the square's box) and on the caption, where the
#   full-range one found nothing but the face itself, at IoU <= 0.38 with boxes a face width off.
# - the face's own look: the grey face box of the aligned crop at the predicted points correlates
#   (zero-mean NCC, APPEARANCE_SIDE px crop) with that of the track's last observation by at least
#   APPEARANCE_MIN_NCC. The mesh is the more sensitive of the two networks, so where it fails the
#   detector rarely sees a face either (measured on closeup.mp4 and jogger.mp4 faces blurred,
#   motion-blurred, pixelated, dimmed, turned or half covered until the mesh lost them: the
#   detector confirmed none); the look does: 0.88-0.99 on closeup blurred by up to 32 px (jogger's
#   smaller face: 0.80 at 8 px, 0.38 at 16), 0.56-0.99 under 25-41 px motion blur, 0.67-0.78 with
#   the top or bottom half of the face covered, where the background left at the face's place
#   (the face inpainted away), a shifted frame or the other clip give at most 0.28.
BRIDGE_MIN_IOU = 0.3
APPEARANCE_SIDE = 32
APPEARANCE_MIN_NCC = 0.6
# A square whose every channel has less spread than this (a black or faded frame) shows no face,
# whatever a network or a correlation says. Levels of 0-255; a face square has tens.
BRIDGE_MIN_STD = 2.0
# A face hidden for longer than max_gap (a board or a passer-by in front of it) comes back as a new
# track; the two are one face again when the new one starts within REJOIN_MAX_SECONDS, where the
# old one was last seen (box IoU of at least BRIDGE_MIN_IOU) and looking like it: REJOIN_MIN_NCC
# between one of the last REJOIN_LOOKS looks before and one of the first after. The hidden frames
# stay out of the joined track, so they pass through unedited, while the face keeps one id, one
# prompt and one edit on either side. The look's bar is lower than a gap frame's: the looks next to
# a long gap are of a face turned since and partly covered, while a different scene at the face's
# place stays far below it; it does not tell two similar faces apart (benchmarks/README.md, #36).
REJOIN_MAX_SECONDS = 3.0
REJOIN_LOOKS = 8  # observations either side compared
REJOIN_MIN_NCC = 0.4
# Landmarks of a partly covered face (a hand passing) no longer keep a face's shape: the mesh bends
# the five points towards what covers them, differently from frame to frame, while a face moving,
# turning and talking changes the shape of its points smoothly. An observation whose points change
# shape (_shape_change) by more than SHAPE_JUMP from both the observation before and the one after
# is such a frame: it stays in the track (the face is there, so it is edited) with its points
# interpolated between the nearest observations that are not. A gap of at most COVERED_GAP frames
# between two such observations (a hand's widest part hides the face from the mesh and its look)
# is bridged as well: the face is behind the hand there as on both sides.
SHAPE_JUMP = 0.05
COVERED_GAP = 2


@dataclass
class FaceTrack:
    """One face over time: everything indexed like ``frames`` (sorted; the detector's gaps already
    bridged where the frames confirm the face, so ``frames`` skips the frames without it)."""

    id: int
    frames: list[int]  # frame indices where the face is present
    boxes: list[list[float]]  # [x0, y0, x1, y1] per entry of frames, in frame pixels
    points: list[np.ndarray]  # (5, 2) alignment points per entry of frames (CANONICAL order)
    # (36, 2) face silhouette from the mesh per entry of frames, None where unknown; an empty list
    # means unknown everywhere (tracks built by hand or read from a boxes-only file).
    outlines: list[np.ndarray | None] = field(default_factory=list)

    def outline(self, position: int) -> np.ndarray | None:
        """The silhouette at a position of ``frames``, or None."""
        return self.outlines[position] if self.outlines else None

    def position(self, frame_index: int) -> int | None:
        """Where ``frame_index`` is in this track's lists; None when the face is not in that frame."""
        i = bisect_left(self.frames, frame_index)
        return i if i < len(self.frames) and self.frames[i] == frame_index else None

    @property
    def median_area(self) -> float:
        b = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        return float(np.median((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))) if len(b) else 0.0


@dataclass
class FaceTracks:
    """All face tracks of one video, with the video geometry they refer to."""

    frames: int
    width: int
    height: int
    fps: float
    tracks: list[FaceTrack]

    def to_json(self) -> dict[str, Any]:
        """The track-file schema; points and outlines are included so a file round-trips."""
        return {
            "frames": int(self.frames),
            "width": int(self.width),
            "height": int(self.height),
            "fps": float(self.fps),
            "tracks": [_track_json(t) for t in self.tracks],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaceTracks:
        """Read a track file: ours, or a user-given / ground-truth one with boxes only.

        Without "points" the alignment points are placed in each box as on an upright frontal face.
        Anything malformed is the user's to fix, hence UserError.
        """
        try:
            header = (int(data["frames"]), int(data["width"]), int(data["height"]))
            fps = float(data["fps"])
            raw_tracks = list(data["tracks"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise UserError(f"bad face tracks: need frames, width, height, fps and tracks ({exc!r})") from None
        if min(header) < 1 or not math.isfinite(fps) or fps <= 0:
            raise UserError("bad face tracks: frames, width and height must be at least 1 and fps a positive number")
        tracks = []
        for raw in raw_tracks:
            try:
                track_id = int(raw["id"])
                frames = [int(f) for f in raw["frames"]]
                boxes = [[float(v) for v in b] for b in raw["boxes"]]
                points = [np.asarray(p, dtype=np.float64) for p in raw.get("points") or []]
                outlines = [None if o is None else np.asarray(o, dtype=np.float64) for o in raw.get("outlines") or []]
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"bad face tracks: a track needs id, frames and boxes ({exc!r})") from None
            where = f"bad face tracks: track {track_id}"
            if frames != sorted(set(frames)) or any(f < 0 for f in frames):
                raise UserError(f"{where}: frames must be increasing, non-negative frame indices")
            if frames and frames[-1] >= header[0]:
                raise UserError(f"{where}: frame {frames[-1]} is past the clip's last frame ({header[0] - 1})")
            numbers = [v for b in boxes for v in b] + [v for p in points for v in p.ravel()]
            if not all(math.isfinite(v) for v in numbers):
                raise UserError(f"{where}: boxes and points must be finite numbers (found NaN or infinity)")
            if len(boxes) != len(frames) or any(len(b) != 4 or b[2] <= b[0] or b[3] <= b[1] for b in boxes):
                raise UserError(f"{where}: needs one [x0, y0, x1, y1] box with x1 > x0, y1 > y0 per frame")
            if not points:
                points = [_points_from_box(b) for b in boxes]
            if len(points) != len(frames) or any(p.shape != (5, 2) or np.ptp(p, axis=0).max() <= 0 for p in points):
                raise UserError(f"{where}: needs five distinct [x, y] points per frame")
            if outlines and (len(outlines) != len(frames) or any(o is not None and o.ndim != 2 for o in outlines)):
                raise UserError(f"{where}: needs one outline (or null) per frame")
            tracks.append(FaceTrack(track_id, frames, boxes, points, outlines))
        if len({t.id for t in tracks}) != len(tracks):
            raise UserError("bad face tracks: track ids must be unique")
        return cls(*header, fps, tracks)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the track file atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FaceTracks:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise UserError(f"cannot read face tracks {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"face tracks {path} are not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"face tracks {path} must hold a JSON object")
        return cls.from_json(data)

    def select(self, spec: str) -> FaceTracks:
        """Keep the faces to edit: "all", "largest" (largest median box) or ids such as "3,5"."""
        spec = spec.strip()
        if spec == "all":
            chosen = list(self.tracks)
        elif spec == "largest":
            chosen = sorted(self.tracks, key=lambda t: (-t.median_area, t.id))[:1]
        else:
            try:
                ids = [int(part) for part in spec.split(",")]
            except ValueError:
                raise UserError(f'bad face selection "{spec}": use "all", "largest" or ids like "0,2"') from None
            known = {t.id: t for t in self.tracks}
            missing = [i for i in ids if i not in known]
            if missing:
                have = ", ".join(str(i) for i in known) or "none"
                raise UserError(f"no face track with id {missing[0]} (ids in this video: {have})")
            chosen = [known[i] for i in sorted(set(ids))]
        return FaceTracks(self.frames, self.width, self.height, self.fps, chosen)

    def in_frame(self, frame_index: int) -> list[FaceTrack]:
        """The tracks present in one frame."""
        return [t for t in self.tracks if t.position(frame_index) is not None]


def _track_json(track: FaceTrack) -> dict[str, Any]:
    data = {
        "id": int(track.id),
        "frames": [int(f) for f in track.frames],
        "boxes": [[round(float(v), 2) for v in b] for b in track.boxes],
        "points": [np.round(p, 2).tolist() for p in track.points],
    }
    if track.outlines:
        data["outlines"] = [None if o is None else np.round(o, 1).tolist() for o in track.outlines]
    return data


def require_face(tracks: FaceTracks, source: str | os.PathLike) -> FaceTracks:
    """For --require-face: no face is the user's problem (wrong file, face too small or hidden)."""
    if not tracks.tracks:
        raise UserError(
            f"no face found in {source}: the video needs a visible face at least about "
            f"{_min_face_pixels(tracks.width, tracks.height)} px tall, or pass a face track file"
        )
    return tracks


def _min_face_pixels(width: int, height: int) -> int:
    """Rough smallest face the tiled detector finds: measured, about 1/20 of the smallest tile."""
    scale = min(1.0, DETECT_MAX_SIDE / max(width, height, 1))
    short = min(width, height) * scale
    tile = short / 2 if short / 2 >= DETECT_MIN_TILE else short
    return max(16, round(tile / 20 / scale))


# --- geometry ---------------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares similarity (rotation, uniform scale, shift) taking src to dst, 2x3.

    Closed form in complex numbers: no reflection can sneak in, no RANSAC randomness.
    """
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    s = src[:, 0] + 1j * src[:, 1]
    d = dst[:, 0] + 1j * dst[:, 1]
    s_mean, d_mean = (w * s).sum(), (w * d).sum()
    s0, d0 = s - s_mean, d - d_mean
    a = (w * d0 * s0.conj()).sum() / (w * np.abs(s0) ** 2).sum()
    b = d_mean - a * s_mean
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def align_points(points: np.ndarray) -> np.ndarray:
    """The unsmoothed transform taking five frame points to the aligned crop of side 1."""
    return similarity_transform(points, CANONICAL_FIVE_POINTS, ALIGNMENT_WEIGHTS)


def _apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ M[:, :2].T + M[:, 2]


def _invert(M: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(M)


def box_from_points(points: np.ndarray) -> list[float]:
    """The face box implied by the five points (CANONICAL_FACE_BOX mapped back into the frame)."""
    inv = _invert(align_points(points))
    x0, y0, x1, y1 = CANONICAL_FACE_BOX
    corners = _apply(inv, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    return [*corners.min(0).tolist(), *corners.max(0).tolist()]


def _points_from_box(box: list[float]) -> np.ndarray:
    """Five points for a box alone, as on an upright frontal face (inverse of box_from_points)."""
    x0, y0, x1, y1 = CANONICAL_FACE_BOX
    rel = (CANONICAL_FIVE_POINTS - [x0, y0]) / [x1 - x0, y1 - y0]
    return rel * [box[2] - box[0], box[3] - box[1]] + box[:2]


def _box_overlaps(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """For every box in a (n, 4) and in b (m, 4): IoU, and intersection over the smaller box
    (which flags a partial detection of a face, e.g. cut by a tile edge, as that face)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    return inter / np.maximum(area_a + area_b - inter, 1e-9), inter / np.maximum(np.minimum(area_a, area_b), 1e-9)


def box_iou(a: Any, b: Any) -> np.ndarray:
    """IoU of every box in ``a`` (n, 4) with every box in ``b`` (m, 4), as an (n, m) array."""
    return _box_overlaps(a, b)[0]


def _is_duplicate(box: list[float], others: list[list[float]]) -> bool:
    """Whether ``box`` is (mostly) the same face as one of ``others``."""
    return bool(others) and bool((_box_overlaps(box, others)[1] > 0.6).any())


# --- detection and landmarks ------------------------------------------------------------------


@dataclass
class _Face:
    """One face in one frame."""

    points: np.ndarray  # (5, 2) frame pixels
    outline: np.ndarray | None  # (36, 2) frame pixels, from the mesh
    score: float = 1.0

    @cached_property
    def box(self) -> list[float]:
        return box_from_points(self.points)


def _tiles(width: int, height: int) -> list[tuple[int, int, int]]:
    """Square detection tiles (x, y, side) overlapping by half, for faces too small for the whole
    frame at the detector's 192 px: tiles of the short side (only if the frame is not square) and
    of half of it (only if not smaller than DETECT_MIN_TILE)."""
    short = min(width, height)
    tiles = []
    for side in (short, short // 2):
        if side < DETECT_MIN_TILE or (side == short and width == height):
            continue
        step = side // 2
        xs = sorted({*range(0, width - side + 1, step), width - side})
        ys = sorted({*range(0, height - side + 1, step), height - side})
        tiles += [(x, y, side) for y in ys for x in xs]
    return tiles


class _FaceFinder:
    """mediapipe's full-range detector and face mesh for one pass over a video of one size."""

    def __init__(self, width: int, height: int) -> None:
        from mediapipe.python.solutions import face_detection, face_mesh

        self.width, self.height = width, height
        self.scale = min(1.0, DETECT_MAX_SIDE / max(width, height))
        self.tiles = _tiles(round(width * self.scale), round(height * self.scale))
        self.next_tile = 0
        self.detector = face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5)
        self.mesh = face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=2, refine_landmarks=True, min_detection_confidence=0.5
        )

    def close(self) -> None:
        self.detector.close()
        self.mesh.close()

    def detect(self, frame: np.ndarray) -> list[_Face]:
        """Faces in the whole (downscaled) frame plus the next tiles, duplicates removed."""
        small = frame
        if self.scale < 1.0:
            size = (round(self.width * self.scale), round(self.height * self.scale))
            small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        regions = [(0, 0, small.shape[1], small.shape[0])]
        for _ in range(min(DETECT_TILES_PER_FRAME, len(self.tiles))):
            x, y, side = self.tiles[self.next_tile]
            regions.append((x, y, side, side))
            self.next_tile = (self.next_tile + 1) % len(self.tiles)
        faces = []
        for x, y, w, h in regions:
            result = self.detector.process(np.ascontiguousarray(small[y : y + h, x : x + w]))
            for det in result.detections or []:
                kp = np.array([(k.x, k.y) for k in det.location_data.relative_keypoints[:4]])
                kp = (kp * [w, h] + [x, y]) / self.scale
                faces.append(_Face(_points_from_keypoints(kp), None, float(det.score[0])))
        faces.sort(key=lambda f: -f.score)
        kept: list[_Face] = []
        for face in faces:
            if not _is_duplicate(face.box, [k.box for k in kept]):
                kept.append(face)
        return kept

    def _context(self, frame: np.ndarray, box: list[float]) -> tuple[np.ndarray, int, int, float] | None:
        """The full-resolution square MESH_CONTEXT times ``box`` around its centre, clipped to the
        frame and shrunk to at most MESH_MAX_SIDE: (crop, its left, its top, the shrink factor), or
        None when too little of it is in the frame."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half = MESH_CONTEXT * max(box[2] - box[0], box[3] - box[1]) / 2
        x0, y0 = max(0, round(cx - half)), max(0, round(cy - half))
        x1, y1 = min(self.width, round(cx + half)), min(self.height, round(cy + half))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        crop = frame[y0:y1, x0:x1]
        shrink = min(1.0, MESH_MAX_SIDE / max(crop.shape[:2]))
        if shrink < 1.0:
            crop = cv2.resize(crop, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(crop), x0, y0, shrink

    def face_evidence(self, frame: np.ndarray, box: list[float]) -> list[float] | None:
        """The box of a face the detector finds at ``box`` (a track's prediction where the mesh
        found no face) when run on the box's context square at full resolution, or None: the
        evidence a bridged frame needs (see BRIDGE_MIN_IOU). A near-uniform square (a black or
        faded frame) is None without a detector call."""
        region = self._context(frame, box)
        if region is None:
            return None
        crop, x0, y0, shrink = region
        if crop.reshape(-1, crop.shape[-1]).std(axis=0).max() < BRIDGE_MIN_STD:
            return None
        best, best_iou = None, BRIDGE_MIN_IOU
        for det in self.detector.process(crop).detections or []:
            kp = np.array([(k.x, k.y) for k in det.location_data.relative_keypoints[:4]])
            found = box_from_points(_points_from_keypoints(kp * [crop.shape[1], crop.shape[0]] / shrink + [x0, y0]))
            overlap = float(box_iou(found, box)[0, 0])
            if overlap >= best_iou:
                best, best_iou = found, overlap
        return best

    def landmarks(self, frame: np.ndarray, box: list[float]) -> _Face | None:
        """The face mesh on a full-resolution square around ``box``: points and outline of the face
        nearest the box centre, or None when the mesh finds no face overlapping the box."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        region = self._context(frame, box)
        if region is None:
            return None
        crop, x0, y0, shrink = region
        result = self.mesh.process(crop)
        best, best_dist = None, math.inf
        for face in result.multi_face_landmarks or []:
            lm = face.landmark
            xy = np.array([(lm[i].x, lm[i].y) for i in _MESH_INDICES]) * [crop.shape[1], crop.shape[0]]
            xy = xy / shrink + [x0, y0]
            dist = math.dist(xy[4], (cx, cy))
            if dist < best_dist:
                best, best_dist = xy, dist
        if best is None:
            return None
        # Eye centre = midpoint of the eye corners: unlike the iris it does not move with the gaze,
        # unlike the lid contour not with blinks.
        points = np.stack([(best[0] + best[1]) / 2, (best[2] + best[3]) / 2, best[4], best[5], best[6]])
        found = _Face(points, best[7:])
        return found if box_iou(found.box, box)[0, 0] >= 0.2 else None


def _points_from_keypoints(kp: np.ndarray) -> np.ndarray:
    """Five points from the detector's eyes, nose tip and mouth centre: the mouth corners sit on
    the eye direction around the mouth centre, as far apart as in CANONICAL_FIVE_POINTS."""
    c = CANONICAL_FIVE_POINTS
    ratio = (c[4, 0] - c[3, 0]) / (c[1, 0] - c[0, 0])
    half_mouth = (kp[1] - kp[0]) * ratio / 2
    return np.stack([kp[0], kp[1], kp[2], kp[3] - half_mouth, kp[3] + half_mouth])


# --- tracking ---------------------------------------------------------------------------------


@dataclass
class _LiveTrack:
    frames: list[int] = field(default_factory=list)  # frames with landmarks or a detection
    faces: list[_Face] = field(default_factory=list)
    # Frames without either where the frame still shows the face at the prediction (_gap_has_face):
    # the only gap frames that to_track bridges.
    confirmed: set[int] = field(default_factory=set)
    look: np.ndarray | None = None  # _appearance at the last observation
    # The looks of the first and the last REJOIN_LOOKS observations (None where near-uniform): an
    # occluder that hides the face for long covers part of it on the frames next to the gap too.
    first_looks: list[np.ndarray | None] = field(default_factory=list)
    last_looks: deque = field(default_factory=lambda: deque(maxlen=REJOIN_LOOKS))

    def predict(self, t: int) -> list[float]:
        """Box at frame t, moving at the velocity of the last two observations."""
        last = np.array(self.faces[-1].box)
        if len(self.frames) < 2:
            return last.tolist()
        velocity = (last - self.faces[-2].box) / (self.frames[-1] - self.frames[-2])
        return (last + velocity * (t - self.frames[-1])).tolist()

    def predict_points(self, t: int) -> np.ndarray:
        """The five points at frame t, moving as in predict."""
        last = self.faces[-1].points
        if len(self.frames) < 2:
            return last
        velocity = (last - self.faces[-2].points) / (self.frames[-1] - self.frames[-2])
        return last + velocity * (t - self.frames[-1])

    def observe(self, t: int, face: _Face, frame: np.ndarray) -> None:
        """The face found in frame t (landmarks or a detection)."""
        self.frames.append(t)
        self.faces.append(face)
        self.look = _appearance(frame, face.points)
        if len(self.first_looks) < REJOIN_LOOKS:
            self.first_looks.append(self.look)
        self.last_looks.append(self.look)

    def continues_as(self, later: _LiveTrack, max_gap: int) -> bool:
        """Whether ``later``, which starts after this track's last frame, is this face back after
        being hidden (see REJOIN_MAX_SECONDS)."""
        gap = later.frames[0] - self.frames[-1]
        if not 0 < gap <= max_gap:
            return False
        if float(box_iou(self.faces[-1].box, later.faces[0].box)[0, 0]) < BRIDGE_MIN_IOU:
            return False
        pairs = [(a, b) for a in self.last_looks for b in later.first_looks if a is not None and b is not None]
        return any(float((a * b).sum()) >= REJOIN_MIN_NCC for a, b in pairs)

    def join(self, later: _LiveTrack) -> None:
        """Take ``later``'s frames on: the frames between stay out unless confirmed (to_track)."""
        self.frames += later.frames
        self.faces += later.faces
        self.confirmed |= later.confirmed
        self.look = later.look
        self.last_looks = later.last_looks

    def to_track(self) -> FaceTrack:
        """Bridge the gaps between observations by linear interpolation, on the confirmed frames
        only: a gap frame without face evidence stays out of the track, so it is not edited (a face
        that leaves for a few frames must not leave a ghost of its edit on them). Also bridged: a
        gap of at most COVERED_GAP frames between two observations of the face partly covered
        (their shape jumps, SHAPE_JUMP): the face is behind what covers it, as on both sides."""
        frames, points, outlines = [], [], []
        faces, jumped = _steadied(self.frames, self.faces)
        for k, (t, face) in enumerate(zip(self.frames, faces)):
            if k:
                t0, prev = self.frames[k - 1], faces[k - 1]
                covered = t - t0 - 1 <= COVERED_GAP and jumped[k - 1] and jumped[k]
                for g in range(t0 + 1, t):
                    if g not in self.confirmed and not covered:
                        continue
                    w = (g - t0) / (t - t0)
                    frames.append(g)
                    points.append((1 - w) * prev.points + w * face.points)
                    both = prev.outline is not None and face.outline is not None
                    outlines.append((1 - w) * prev.outline + w * face.outline if both else None)
            frames.append(t)
            points.append(face.points)
            outlines.append(face.outline)
        return FaceTrack(-1, frames, [box_from_points(p) for p in points], points, outlines)


def _shape_change(a: np.ndarray, b: np.ndarray) -> float:
    """How much the five points ``b`` differ from ``a`` other than by a similarity: the largest
    residual of the fit of ``b`` onto ``a``, in ``a``'s inter-ocular distances (see SHAPE_JUMP)."""
    fitted = _apply(similarity_transform(b, a), b)
    return float(np.linalg.norm(fitted - a, axis=1).max() / max(np.linalg.norm(a[1] - a[0]), 1e-6))


def _steadied(frames: list[int], faces: list[_Face]) -> tuple[list[_Face], list[bool]]:
    """``faces`` with the observations whose shape jumps from both neighbours (SHAPE_JUMP) given
    points and outline interpolated between the nearest observations that do not; and which
    observations those are."""
    n = len(faces)
    change = [_shape_change(faces[k - 1].points, faces[k].points) for k in range(1, n)]
    jumped = [0 < k < n - 1 and change[k - 1] > SHAPE_JUMP and change[k] > SHAPE_JUMP for k in range(n)]
    out = list(faces)
    for k in (k for k in range(n) if jumped[k]):
        i = max(j for j in range(k) if not jumped[j])
        j = min(j for j in range(k + 1, n) if not jumped[j])
        w = (frames[k] - frames[i]) / (frames[j] - frames[i])
        a, b = faces[i], faces[j]
        both = a.outline is not None and b.outline is not None
        out[k] = _Face((1 - w) * a.points + w * b.points, (1 - w) * a.outline + w * b.outline if both else None)
    return out, jumped


def track_faces(
    frames: Iterable[np.ndarray],
    *,
    fps: float,
    progress: Callable[[int], None] | None = None,
    max_gap: int = 5,
    min_track_frames: int = 5,
) -> FaceTracks:
    """Find and track every face in a stream of RGB uint8 frames (held one at a time).

    Per frame: detection (whole frame plus rotating tiles) proposes faces; detections are assigned
    to the live tracks by box IoU against each track's constant-velocity prediction (Hungarian);
    every track, matched or not, then gets its landmarks from the face mesh around its box, so a
    face the detector misses for a moment (head turn, motion blur) is still followed. A track
    unseen for more than ``max_gap`` frames ends; the frames of a shorter gap are interpolated
    where the frame still shows the face at the prediction (_gap_has_face: its look, or the
    detector there) and left out of the track, hence unedited, where it does not. A face hidden
    for longer (a board passing in front) keeps its track when it comes back where it was, looking
    the same (REJOIN_MAX_SECONDS); the hidden frames stay out of it. A track is kept
    with ``min_track_frames`` frames (or as many as the video has), or with
    :func:`min_track_length` frames if the face mesh found the face in one of them; shorter ones
    are dropped as flukes (a detector-only track of 3 frames just below a small face, measured in
    an 8-frame clip). Ids are 0, 1, ... by first frame, then by left edge. ``progress`` is called
    with the number of frames done.
    """
    finder: _FaceFinder | None = None
    live: list[_LiveTrack] = []
    done: list[_LiveTrack] = []
    width = height = count = 0
    try:
        for t, frame in enumerate(frames):
            if finder is None:
                height, width = frame.shape[:2]
                finder = _FaceFinder(width, height)
            _track_frame(finder, frame, t, live)
            done += [tr for tr in live if t - tr.frames[-1] > max_gap]
            live = [tr for tr in live if t - tr.frames[-1] <= max_gap]
            count = t + 1
            if progress is not None:
                progress(count)
    finally:
        if finder is not None:
            finder.close()
    rejoin = max(max_gap + 1, round(REJOIN_MAX_SECONDS * fps))
    tracks = [tr.to_track() for tr in _rejoined(done + live, rejoin)]
    shortest = min_track_length(count, min_track_frames)
    tracks = [
        tr
        for tr in tracks
        if len(tr.frames) >= min(min_track_frames, count)
        or (len(tr.frames) >= shortest and any(o is not None for o in tr.outlines))
    ]
    tracks.sort(key=lambda tr: (tr.frames[0], tr.boxes[0][0]))
    for i, tr in enumerate(tracks):
        tr.id = i
    return FaceTracks(count, width, height, float(fps), tracks)


def _rejoined(tracks: list[_LiveTrack], max_gap: int) -> list[_LiveTrack]:
    """Tracks of one face hidden for a while joined into one (_LiveTrack.continues_as): each
    track, in order of its start, continues the latest-ending earlier track it matches."""
    kept: list[_LiveTrack] = []
    for track in sorted(tracks, key=lambda tr: tr.frames[0]):
        before = [k for k in kept if k.continues_as(track, max_gap)]
        if before:
            max(before, key=lambda k: k.frames[-1]).join(track)
        else:
            kept.append(track)
    return kept


def min_track_length(count: int, longest: int = 5) -> int:
    """The fewest frames a kept track has in a clip of ``count`` frames: a quarter of the clip, at
    least 2 (one frame alone is a fluke) and at most ``longest`` or the clip itself. A face in 4 of
    8 frames is kept, a one-frame detection only in a one-frame clip. (track_faces asks a track
    shorter than ``longest`` for the face mesh's word too.)"""
    return min(longest, count, max(2, math.ceil(count / 4)))


def _track_frame(finder: _FaceFinder, frame: np.ndarray, t: int, live: list[_LiveTrack]) -> None:
    """One frame of track_faces: extends ``live`` in place and appends new tracks to it."""
    detections = finder.detect(frame)
    matched: dict[int, int] = {}  # live track -> detection
    if live and detections:
        iou = box_iou([tr.predict(t) for tr in live], [d.box for d in detections])
        rows, cols = linear_sum_assignment(-iou)
        matched = {r: c for r, c in zip(rows, cols) if iou[r, c] >= 0.15}
    claimed: list[list[float]] = []
    missed: list[_LiveTrack] = []  # no landmarks at the prediction: a gap frame, if the face is back later
    # Tracks with a detection go first: their boxes are the most trustworthy claims on a face.
    for r in sorted(range(len(live)), key=lambda r: r not in matched):
        det = detections[matched[r]] if r in matched else None
        face = finder.landmarks(frame, det.box if det else live[r].predict(t)) or det
        if face is not None and not _is_duplicate(face.box, claimed):
            live[r].observe(t, face, frame)
            claimed.append(face.box)
        elif face is None:
            missed.append(live[r])
    used = set(matched.values())
    for c, det in enumerate(detections):
        if c in used or _is_duplicate(det.box, claimed):
            continue
        face = finder.landmarks(frame, det.box) or det
        if not _is_duplicate(face.box, claimed):
            live.append(track := _LiveTrack())
            track.observe(t, face, frame)
            claimed.append(face.box)
    # After every claim: a face that another track holds is that track's, no evidence for this one.
    for track in missed:
        if _gap_has_face(finder, frame, t, track, claimed):
            track.confirmed.add(t)


def _gap_has_face(
    finder: _FaceFinder, frame: np.ndarray, t: int, track: _LiveTrack, claimed: list[list[float]]
) -> bool:
    """Whether frame t, where ``track`` got no landmarks, still shows its face where the track
    predicts it (see BRIDGE_MIN_IOU): its look, or else the detector at the predicted box."""
    box = track.predict(t)
    if _is_duplicate(box, claimed):
        return False
    look = _appearance(frame, track.predict_points(t))
    if look is not None and track.look is not None and float((look * track.look).sum()) >= APPEARANCE_MIN_NCC:
        return True
    evidence = finder.face_evidence(frame, box)
    return evidence is not None and not _is_duplicate(evidence, claimed)


def _appearance(frame: np.ndarray, points: np.ndarray) -> np.ndarray | None:
    """The face's look for bridging: the grey face box (CANONICAL_FACE_BOX) of the aligned crop of
    side APPEARANCE_SIDE at ``points``, zero mean and unit norm (so a dot product of two is their
    NCC); None where it is near-uniform (BRIDGE_MIN_STD), a black frame for one."""
    crop = crop_face(frame, align_points(points) * APPEARANCE_SIDE, APPEARANCE_SIDE)
    x0, y0, x1, y1 = (round(v * APPEARANCE_SIDE) for v in CANONICAL_FACE_BOX)
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)[y0:y1, x0:x1].astype(np.float64)
    grey -= grey.mean()
    if grey.std() < BRIDGE_MIN_STD:
        return None
    return grey / np.linalg.norm(grey)


def detect_video_faces(path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> FaceTracks:
    """track_faces over a video file, streamed."""
    from ipfacediff.video import iter_frames, probe_video

    info = probe_video(path)
    return track_faces(iter_frames(path), fps=info.fps, progress=progress)


def faces_report(
    input_path: str | os.PathLike,
    json_path: str | os.PathLike | None = None,
    preview_path: str | os.PathLike | None = None,
    segmenter: OccluderSegmenter | None = None,
) -> FaceTracks:
    """The whole ``ipfacediff faces`` command: detect, write the track file and the preview (its
    occlusion masks with ``segmenter``'s regions where one is given)."""
    tracks = detect_video_faces(input_path)
    if json_path is not None:
        tracks.save(json_path)
    if preview_path is not None:
        from ipfacediff.video import iter_frames

        write_preview(preview_path, lambda: iter_frames(input_path), tracks, tracks.fps, segmenter=segmenter)
    return tracks


# --- alignment --------------------------------------------------------------------------------

# One-euro filter on the alignment parameters (face centre in crop widths, log scale, angle in
# radians), in units of frames: the noise to remove is per-frame landmark noise whatever the frame
# rate. Cutoff in cycles per frame, rising with the parameter's speed (per frame) times beta.
SMOOTH_MIN_CUTOFF = 0.2
SMOOTH_BETA = 10.0
SMOOTH_D_CUTOFF = 0.1
SMOOTH_PAD = 10  # frames


def alignment_transforms(track: FaceTrack, size: int, *, smooth: bool = True) -> dict[int, np.ndarray]:
    """Frame index -> 2x3 similarity taking frame pixels to the aligned crop of side ``size``.

    The per-frame least-squares fit of the five points follows landmark noise, which makes the
    crop shake; with ``smooth`` the transform parameters (face centre, log scale, angle) go through
    a one-euro filter run forwards and backwards and averaged, which removes the shake without the
    lag a causal filter would add (the whole track is known). Runs of consecutive frames are
    smoothed separately: a track read from a file may skip frames.
    """
    unit = [align_points(p) for p in track.points]
    if smooth:
        breaks = [0, *(np.flatnonzero(np.diff(track.frames) > 1) + 1), len(unit)]
        unit = [M for i, j in zip(breaks, breaks[1:]) for M in _smooth_transforms(unit[i:j])]
    return {f: M * size for f, M in zip(track.frames, unit)}


def _smooth_transforms(transforms: list[np.ndarray]) -> list[np.ndarray]:
    if len(transforms) < 3:
        return transforms
    a = np.array([M[0, 0] + 1j * M[1, 0] for M in transforms])  # scale * e^(i angle)
    b = np.array([M[0, 2] + 1j * M[1, 2] for M in transforms])
    centre = (0.5 + 0.5j - b) / a  # the frame point at the crop centre
    unit = np.median(np.abs(a))  # frame pixels -> crop widths, so one setting fits any face size
    params = np.stack([centre.real * unit, centre.imag * unit, np.log(np.abs(a)), np.unwrap(np.angle(a))], axis=1)
    # Odd reflection at both ends (as scipy's filtfilt pads) lets each pass reach the first and
    # last frames already moving with the face, so the ends do not lag either.
    pad = min(len(params) - 1, SMOOTH_PAD)
    padded = np.concatenate([2 * params[0] - params[pad:0:-1], params, 2 * params[-1] - params[-2 : -pad - 2 : -1]])
    smooth = ((_one_euro(padded) + _one_euro(padded[::-1])[::-1]) / 2)[pad : pad + len(params)]
    a = np.exp(smooth[:, 2] + 1j * smooth[:, 3])
    centre = (smooth[:, 0] + 1j * smooth[:, 1]) / unit
    b = 0.5 + 0.5j - a * centre
    return [np.array([[x.real, -x.imag, y.real], [x.imag, x.real, y.imag]]) for x, y in zip(a, b)]


def _one_euro(x: np.ndarray) -> np.ndarray:
    """One-euro filter (Casiez et al. 2012) over axis 0, each column on its own, frame units."""

    def alpha(cutoff: np.ndarray | float) -> np.ndarray | float:
        return 1.0 / (1.0 + 1.0 / (2 * math.pi * cutoff))

    out = np.empty_like(x)
    out[0] = x[0]
    speed = np.zeros(x.shape[1])
    for t in range(1, len(x)):
        speed += alpha(SMOOTH_D_CUTOFF) * ((x[t] - out[t - 1]) - speed)
        out[t] = out[t - 1] + alpha(SMOOTH_MIN_CUTOFF + SMOOTH_BETA * np.abs(speed)) * (x[t] - out[t - 1])
    return out


def crop_face(frame: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """The aligned crop. A face much larger than the crop is first shrunk with area averaging so
    that the crop does not alias; outside the frame the image is mirrored, which the diffusion
    model takes better than black."""
    scale = math.sqrt(abs(np.linalg.det(M[:, :2])))
    factor = int(1 / scale)  # integer shrink first, the warp does the rest
    if factor >= 2:
        inv = _invert(M)
        corners = _apply(inv, np.array([[0, 0], [size, 0], [size, size], [0, size]], float))
        x0, y0 = np.floor(corners.min(0)).astype(int) - factor
        x1, y1 = np.ceil(corners.max(0)).astype(int) + factor
        # Blocks on a fixed grid of the frame: a still background shrinks the same in every frame.
        x0, y0 = max(x0, 0) // factor * factor, max(y0, 0) // factor * factor
        w, h = (min(x1, frame.shape[1]) - x0) // factor, (min(y1, frame.shape[0]) - y0) // factor
        if w >= 2 and h >= 2:
            roi = frame[y0 : y0 + h * factor, x0 : x0 + w * factor]
            small = cv2.resize(roi, (w, h), interpolation=cv2.INTER_AREA)
            # small pixel (u, v) covers roi pixels factor*u .. factor*u+factor-1 (centre +(factor-1)/2)
            to_frame = np.array([[factor, 0, x0 + (factor - 1) / 2], [0, factor, y0 + (factor - 1) / 2]])
            M = M @ np.vstack([to_frame, [0, 0, 1]])
            frame = small
    return cv2.warpAffine(frame, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


# --- mask and paste-back ----------------------------------------------------------------------

# Feather width of the mask edge and blur radius of the seam colour correction, in crop sides.
MASK_FEATHER = 0.05
SEAM_SIGMA = 0.06
# The paste-back keeps this many frame pixels more around what is in front of a face: the masks
# fall short of an occluder's edge by up to a pixel in places (benchmarks/README.md, session 23).
OCCLUSION_GROW_PX = 1
# The share of the grown mask above which the paste-back keeps a pixel whole, and with it the rest
# of the pixel's 2x2 block of the frame: a written frame shares its colour between the four.
OCCLUSION_SOLID = 0.99


def face_mask(track: FaceTrack, frame_index: int, M: np.ndarray, size: int, *, hair: bool = False) -> np.ndarray:
    """Soft face mask (float32, size x size, 1 inside) in the crop of transform ``M``.

    The mesh silhouette (or the canonical ellipse where the frame has none) filled, then ramped
    from 0 at its edge to 1 at MASK_FEATHER inside, so the pasted face fades in within the face
    rather than spilling onto the background. ``hair``: the whole crop, feathered at its edges:
    hair reaches past any face outline (long hair falls to the shoulders), so an edit that
    changes it is blended back wherever the crop sees.
    """
    i = track.position(frame_index)
    if i is None:
        raise KeyError(f"face {track.id} is not in frame {frame_index}")
    outline = track.outline(i)
    if outline is None:
        cx, cy, rx, ry = CANONICAL_FACE_ELLIPSE
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        polygon = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1) * size
    else:
        polygon = _apply(M, np.asarray(outline, dtype=np.float64))
    if hair:
        inset = 1.0  # the crop's outermost pixels stay outside: 0 at the edge, as for any mask
        polygon = np.array(
            [[inset, inset], [size - 1 - inset, inset], [size - 1 - inset, size - 1 - inset], [inset, size - 1 - inset]]
        )
    hull = cv2.convexHull(np.round(polygon * 16).astype(np.int32))
    filled = np.zeros((size, size), np.uint8)
    cv2.fillPoly(filled, [hull], 1, lineType=cv2.LINE_8, shift=4)
    filled = cv2.copyMakeBorder(filled, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)  # crop edge = outside
    depth = cv2.distanceTransform(filled, cv2.DIST_L2, 5)[1:-1, 1:-1]
    ramp = np.clip(depth / max(1.0, MASK_FEATHER * size), 0.0, 1.0)
    return (ramp * ramp * (3 - 2 * ramp)).astype(np.float32)


def inner_face_share(side: int) -> np.ndarray:
    """(side, side) float32: the share of each cell of a side x side grid over an aligned crop that
    lies inside :data:`CANONICAL_INNER_FACE` (1 inside, 0 outside, fractions on its border)."""
    fine = side * 8
    filled = np.zeros((fine, fine), np.float32)
    cv2.fillPoly(
        filled, [np.round(CANONICAL_INNER_FACE * fine * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_8, shift=4
    )
    return filled.reshape(side, 8, side, 8).mean(axis=(1, 3))


def paste_face(
    frame: np.ndarray,
    edited_crop: np.ndarray,
    M: np.ndarray,
    mask: np.ndarray,
    *,
    match_colour: bool = True,
    overlay: bool = False,
    occlusion: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``frame`` with ``edited_crop`` (the crop of transform M, edited) blended back in.

    What is pasted is the edit's *change* to the frame's own crop, warped back and added under the
    mask: a crop is usually smaller than the face it was cut from (a 512² crop of a face that is
    700 px tall in a 4K frame, FaceWorld's 64² crop of a 100 px face), so pasting the crop itself
    would blur every pixel under the mask, where adding its change leaves the frame's own detail
    wherever the edit changed nothing (the pipeline's detail transfer makes those crop pixels the
    input's, bit for bit). ``overlay`` pastes the crop itself (a debug tint).

    With ``match_colour``, the low-frequency colour difference between the original and edited
    crop, measured where the mask is partial (the seam), is added back to the edited crop near the
    seam, fading out towards the face interior: a global tint or local shading change that the
    edit introduced then cannot draw a visible border.

    ``occlusion`` (float, in the crop, any side: :mod:`ipfacediff.occlusion`) is what is in front
    of the face: the mask is scaled by one minus it, grown by OCCLUSION_GROW_PX in the frame, so
    where it is 1 the frame is kept exactly (a hand passing the eyes is not drawn over), and so is
    the rest of each 2x2 block of the frame such a pixel is in: the written video stores one
    colour for the four, and an edited pixel beside a kept one would move the kept one's colour.
    The seam correction still measures at the face's own edge.
    """
    size = edited_crop.shape[0]
    edited = edited_crop.astype(np.float32)
    original = None if overlay and not match_colour else crop_face(frame, M, size).astype(np.float32)
    if match_colour:
        edited += _seam_correction(original - edited, mask)
    inv = _invert(M)
    corners = _apply(inv, np.array([[0, 0], [size, 0], [size, size], [0, size]], float))
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 1, [frame.shape[1], frame.shape[0]])
    out = frame.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    # Frame pixel (x0 + u, y0 + v) sits at crop point M @ (x0 + u, y0 + v, 1).
    M_roi = M.copy()
    M_roi[:, 2] += M[:, :2] @ [x0, y0]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    alpha = cv2.warpAffine(mask, M_roi, (x1 - x0, y1 - y0), flags=flags, borderMode=cv2.BORDER_CONSTANT)
    if occlusion is not None:
        if occlusion.shape != mask.shape:
            occlusion = cv2.resize(occlusion, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
        kept = cv2.warpAffine(occlusion.astype(np.float32), M_roi, (x1 - x0, y1 - y0), flags=flags)
        side = 2 * OCCLUSION_GROW_PX + 1
        kept = cv2.dilate(kept, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
        alpha *= 1.0 - np.maximum(kept, _whole_chroma_blocks(kept >= OCCLUSION_SOLID, x0 % 2, y0 % 2))
    roi = out[y0:y1, x0:x1].astype(np.float32)
    if overlay:
        face = cv2.warpAffine(edited, M_roi, (x1 - x0, y1 - y0), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        roi += alpha[..., None] * (face - roi)
    else:
        change = cv2.warpAffine(
            edited - original, M_roi, (x1 - x0, y1 - y0), flags=flags, borderMode=cv2.BORDER_CONSTANT
        )
        roi += alpha[..., None] * change
    out[y0:y1, x0:x1] = np.clip(np.round(roi), 0, 255).astype(np.uint8)
    return out


def _whole_chroma_blocks(kept: np.ndarray, odd_x: int, odd_y: int) -> np.ndarray:
    """float32 1 over every 2x2 block of the frame (blocks start at even frame coordinates; the
    array's first pixel is at an odd one where ``odd_x``/``odd_y``) holding a pixel of ``kept`` (bool)."""
    height, width = kept.shape
    padded = np.pad(kept, ((odd_y, (height + odd_y) % 2), (odd_x, (width + odd_x) % 2)))
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any(axis=(1, 3))
    whole = blocks.repeat(2, axis=0).repeat(2, axis=1)[odd_y : odd_y + height, odd_x : odd_x + width]
    return whole.astype(np.float32)


def _seam_correction(diff: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Low-pass of ``diff`` weighted by the seam band (normalised convolution), at quarter
    resolution since only low frequencies are kept."""
    size = mask.shape[0]
    band = 4 * mask * (1 - mask)
    small = max(8, size // 4)
    sigma = SEAM_SIGMA * small
    w = cv2.GaussianBlur(cv2.resize(band, (small, small), interpolation=cv2.INTER_AREA), (0, 0), sigma)
    weighted = cv2.resize(diff * band[..., None], (small, small), interpolation=cv2.INTER_AREA)
    num = cv2.GaussianBlur(weighted, (0, 0), sigma)
    low = num / (w[..., None] + 1e-3)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)


# --- output -----------------------------------------------------------------------------------


def write_preview(
    path: str | os.PathLike,
    frames: Sequence[np.ndarray] | Callable[[], Iterable[np.ndarray]],
    tracks: FaceTracks,
    fps: float,
    *,
    occlusion: bool = True,
    segmenter: OccluderSegmenter | None = None,
) -> Path:
    """Debug video: each face's box and id, alignment points, outline and mask tinted green, and
    with ``occlusion`` its occlusion mask as an edit uses it (hands and what differs from the
    face's own look over its track, :func:`~ipfacediff.occlusion.track_occlusion`) tinted red.
    Those masks need the whole track before its first frame is drawn, so the frames are read twice:
    ``frames`` is a sequence, or a callable that gives them afresh (a video read again). With
    ``segmenter`` (a model set's :class:`~ipfacediff.models.segmenter.OccluderSegmenter`) its
    regions are in the masks, as in an edit with that model."""
    from ipfacediff.video import write_video

    size = 128
    transforms = {t.id: alignment_transforms(t, size) for t in tracks.tracks}
    again = frames if callable(frames) else lambda: frames
    masks = _preview_occlusion(again(), tracks, transforms, size, segmenter) if occlusion else None
    return write_video(path, _preview_frames(again(), tracks, transforms, size, masks), fps)


def _preview_occlusion(
    frames: Iterable[np.ndarray],
    tracks: FaceTracks,
    transforms: dict[int, dict[int, np.ndarray]],
    size: int,
    segmenter: OccluderSegmenter | None = None,
) -> dict[int, dict[int, np.ndarray]]:
    """Each face's occlusion masks (uint8, ``size``) by frame, found as an edit finds them."""
    from ipfacediff.occlusion import LOOK_SIDE, OcclusionFinder, segmented_regions, track_occlusion

    hands: dict[int, dict[int, list[np.ndarray]]] = {t.id: {} for t in tracks.tracks}
    looks: dict[int, dict[int, np.ndarray]] = {t.id: {} for t in tracks.tracks}
    with OcclusionFinder() as finder:
        for index, frame in enumerate(frames):
            for track in tracks.in_frame(index):
                M = transforms[track.id][index]
                finder.look(hands[track.id], index, frame, M, size, key=track.id)
                looks[track.id][index] = crop_face(frame, M * (LOOK_SIDE / size), LOOK_SIDE)
    masks = {}
    for track in tracks.tracks:
        by_frame = {f: transforms[track.id][f] for f in looks[track.id]}

        def face_of(frame: int, track: FaceTrack = track) -> np.ndarray:
            return face_mask(track, frame, transforms[track.id][frame] * (LOOK_SIDE / size), LOOK_SIDE)

        crop_of = looks[track.id].__getitem__
        held = None if segmenter is None else segmented_regions(segmenter, sorted(by_frame), crop_of, face_of)
        found = track_occlusion(hands[track.id], by_frame, crop_of, size, face_of, held)
        masks[track.id] = {f: np.round(m * 255).astype(np.uint8) for f, m in found.items()}
    return masks


def _preview_frames(
    frames: Iterable[np.ndarray],
    tracks: FaceTracks,
    transforms: dict[int, dict[int, np.ndarray]],
    size: int,
    occlusion: dict[int, dict[int, np.ndarray]] | None = None,
) -> Iterator[np.ndarray]:
    green = np.zeros((size, size, 3), np.uint8)
    green[..., 1] = 255
    red = np.zeros((size, size, 3), np.uint8)
    red[..., 0] = 255
    for t, frame in enumerate(frames):
        out = frame.copy()
        for track in tracks.in_frame(t):
            M = transforms[track.id][t]
            mask = face_mask(track, t, M, size)
            stored = None if occlusion is None else occlusion[track.id].get(t)
            occluded = None if stored is None else stored.astype(np.float32) / 255.0
            out = paste_face(out, green, M, 0.35 * mask, match_colour=False, overlay=True, occlusion=occluded)
            if occluded is not None and occluded.any():
                out = paste_face(out, red, M, 0.5 * occluded * mask, match_colour=False, overlay=True)
        for track in tracks.in_frame(t):
            i = track.position(t)
            x0, y0, x1, y1 = (round(v) for v in track.boxes[i])
            cv2.rectangle(out, (x0, y0), (x1, y1), (255, 200, 0), 2)
            cv2.putText(out, str(track.id), (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 200, 0), 2)
            if (outline := track.outline(i)) is not None:
                cv2.polylines(out, [np.round(outline).astype(np.int32)], True, (0, 160, 255), 1)
            for x, y in track.points[i]:
                cv2.circle(out, (round(x), round(y)), 2, (255, 0, 0), -1)
        yield out
