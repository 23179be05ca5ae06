"""What is in front of a face: per-frame occlusion masks in the aligned crop.

The paste-back adds the edit's change to the frame under the face mask, and the face mask is the
face's outline: a hand passing the eyes, a microphone before the mouth lie inside it, so without
an occlusion mask the edit paints eyeglasses onto the hand and a beard onto the microphone. An
occlusion mask (1 where something covers the face) takes those pixels out of the paste-back, so
they keep the frame exactly, and out of the local blend, so the edit is not spent there.

Hands come from mediapipe's hand landmarker (the palm detector and the 21-point hand model the
wheel bundles), run on a square of the frame around the face: a hand is the filled hull of its
palm points with the fingers drawn as thick segments, grown by a margin and feathered outwards,
so the hand itself is covered with weight 1 and the fade lies on the face. Other occluders are
not found yet (:data:`OCCLUSION_METHOD` names what is): a person segmenter calls a held microphone
part of the person, and neither a face's look over its track nor a small segmenter trained on
pasted occluders found most of them without also marking clean faces (benchmarks/README.md).

mediapipe is imported where it is used, as in :mod:`ipfacediff.face`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

# What the masks are made from, as .run.json records it.
OCCLUSION_METHOD = "hands"

# The hand landmarker looks at the square this many times the crop's side in the frame, around the
# crop's centre: a hand that reaches into the crop has its palm outside it more often than not.
HAND_CONTEXT = 2.0
# That square is shrunk to at most this side (the palm detector looks at 192 px anyway).
HAND_MAX_SIDE = 512
HAND_MIN_CONFIDENCE = 0.5

# mediapipe's 21 hand points: 0 the wrist, then four per finger from its root to its tip.
HAND_PALM = (0, 1, 2, 5, 9, 13, 17)
HAND_FINGERS = ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16), (17, 18, 19, 20))
# Sizes of the drawn hand in units of its palm (wrist to the middle finger's root): the thickness
# of a finger's segments (a finger is about a third of the palm wide, the thumb's root wider), the
# margin the region grows by (the points are joint centres and can be off by a few pixels) and the
# feather beyond it. At least the pixels below, so a hand in a small crop is still covered.
HAND_FINGER_WIDTH = 0.42
HAND_MARGIN = 0.12
HAND_FEATHER = 0.10
# The heel of the palm bulges past the wrist-to-little-finger line, and a hand in front of the face
# has its wrist and forearm there too: the region takes in a point this far (palms) outside that
# line and a forearm this long and wide beyond the wrist.
HAND_HEEL = 0.25
HAND_FOREARM_LENGTH = 1.0
HAND_FOREARM_WIDTH = 0.9
HAND_MIN_MARGIN_PX = 2.0
HAND_MIN_FEATHER_PX = 2.0


def hand_region(hands: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(size, size) float32 mask of ``hands``, each (21, 2) hand points in crop pixels: 1 over the
    hand and its margin, fading to 0 over the feather outside it."""
    covered = np.zeros((size, size), np.uint8)
    feather = 0.0
    for points in hands:
        points = np.asarray(points, np.float64)
        palm = max(1.0, float(np.linalg.norm(points[9] - points[0])))
        margin = max(HAND_MIN_MARGIN_PX, HAND_MARGIN * palm)
        feather = max(feather, HAND_MIN_FEATHER_PX, HAND_FEATHER * palm)
        width = HAND_FINGER_WIDTH * palm + 2 * margin
        shape = np.zeros((size, size), np.uint8)
        palm_points = points[list(HAND_PALM)]
        edge = points[17] - points[0]
        outward = np.array([edge[1], -edge[0]]) / max(1e-6, float(np.linalg.norm(edge)))
        if outward @ (points[0] + edge / 2 - palm_points.mean(0)) < 0:
            outward = -outward
        heel = points[0] + 0.6 * edge + HAND_HEEL * palm * outward
        hull = cv2.convexHull(np.round(np.vstack([palm_points, heel]) * 16).astype(np.int32))
        cv2.fillPoly(shape, [hull], 1, lineType=cv2.LINE_8, shift=4)
        cv2.polylines(shape, [hull], True, 1, thickness=max(1, round(2 * margin)), lineType=cv2.LINE_8, shift=4)
        elbow = points[0] + HAND_FOREARM_LENGTH * (points[0] - points[9]) / palm * palm
        forearm = np.round(np.array([points[0], elbow]) * 16).astype(np.int32)
        cv2.polylines(
            shape, [forearm], False, 1, thickness=max(1, round(HAND_FOREARM_WIDTH * palm + 2 * margin)), shift=4
        )
        for finger in HAND_FINGERS:
            line = np.round(points[list(finger)] * 16).astype(np.int32)
            cv2.polylines(shape, [line], False, 1, thickness=max(1, round(width)), lineType=cv2.LINE_8, shift=4)
            for x, y in points[list(finger)]:
                cv2.circle(shape, (round(x * 16), round(y * 16)), max(1, round(width * 8)), 1, -1, cv2.LINE_8, shift=4)
        covered |= shape
    if not covered.any():
        return np.zeros((size, size), np.float32)
    outside = cv2.distanceTransform(1 - covered, cv2.DIST_L2, 5)
    ramp = np.clip(1.0 - outside / feather, 0.0, 1.0)
    return (ramp * ramp * (3 - 2 * ramp)).astype(np.float32)


class OcclusionFinder:
    """The occlusion masks of one pass over a video (``with OcclusionFinder() as finder``).

    Each face (``key``: its track id) has its own hand landmarker, made on first use, in
    mediapipe's video mode: a hand found once is followed from its last landmarks, which finds it
    in frames where the palm detector alone misses it (a palm turned or cut by the square's edge).
    A face's frames go in in order."""

    def __init__(self) -> None:
        self._hands: dict[int, object] = {}

    def __enter__(self) -> OcclusionFinder:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        for graph in self._hands.values():
            graph.close()
        self._hands.clear()

    def hands(self, frame: np.ndarray, M: np.ndarray, size: int, key: int = 0) -> list[np.ndarray]:
        """The hands near the face of crop transform ``M`` (side ``size``): (21, 2) points each,
        in frame pixels."""
        region = _context_square(frame, M, size)
        if region is None:
            return []
        square, x0, y0, shrink = region
        if key not in self._hands:
            from mediapipe.python.solutions import hands

            self._hands[key] = hands.Hands(
                static_image_mode=False,
                max_num_hands=2,
                model_complexity=1,
                min_detection_confidence=HAND_MIN_CONFIDENCE,
                min_tracking_confidence=HAND_MIN_CONFIDENCE,
            )
        result = self._hands[key].process(square)
        found = []
        for hand in result.multi_hand_landmarks or []:
            xy = np.array([(p.x, p.y) for p in hand.landmark]) * [square.shape[1], square.shape[0]]
            found.append(xy / shrink + [x0, y0])
        return found

    def mask(self, frame: np.ndarray, M: np.ndarray, size: int, key: int = 0) -> np.ndarray:
        """(size, size) float32 occlusion mask in the crop of ``M``: 1 where something is in front
        of the face (the paste-back keeps the frame there)."""
        return hand_region([to_crop(M, points) for points in self.hands(frame, M, size, key)], size)


def occlusion_masks(
    frames: np.ndarray | Iterable[np.ndarray], transforms: Sequence[np.ndarray], size: int
) -> np.ndarray:
    """(N, size, size) float32 occlusion masks (:meth:`OcclusionFinder.mask`) of N RGB frames
    (N, H, W, 3) uint8, each with its frame → crop transform (as
    :func:`~ipfacediff.face.alignment_transforms` gives them, in frame order)."""
    masks = []
    with OcclusionFinder() as finder:
        for frame, M in zip(frames, transforms, strict=True):
            masks.append(finder.mask(np.ascontiguousarray(frame), np.asarray(M, np.float64), size))
    return np.stack(masks) if masks else np.zeros((0, size, size), np.float32)


def occluded_share(occlusion: np.ndarray, face: np.ndarray) -> float:
    """The share of the face mask (:func:`~ipfacediff.face.face_mask`) that ``occlusion`` covers."""
    if occlusion.shape != face.shape:
        occlusion = cv2.resize(occlusion, face.shape[::-1], interpolation=cv2.INTER_LINEAR)
    total = float(face.sum())
    return float((occlusion * face).sum()) / total if total > 0 else 0.0


def to_crop(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Frame points (n, 2) in the crop of transform ``M``."""
    return np.asarray(points, np.float64) @ M[:, :2].T + M[:, 2]


def _context_square(frame: np.ndarray, M: np.ndarray, size: int) -> tuple[np.ndarray, int, int, float] | None:
    """The frame's square HAND_CONTEXT times the crop around its centre, clipped to the frame and
    shrunk to at most HAND_MAX_SIDE: (square, its left, its top, the shrink), or None when too
    little of it is in the frame."""
    inv = cv2.invertAffineTransform(M)
    cx, cy = to_crop(inv, np.array([[size / 2, size / 2]]))[0]
    half = HAND_CONTEXT * size / math.sqrt(abs(np.linalg.det(M[:, :2]))) / 2
    height, width = frame.shape[:2]
    x0, y0 = max(0, round(cx - half)), max(0, round(cy - half))
    x1, y1 = min(width, round(cx + half)), min(height, round(cy + half))
    if x1 - x0 < 16 or y1 - y0 < 16:
        return None
    square = frame[y0:y1, x0:x1]
    shrink = min(1.0, HAND_MAX_SIDE / max(square.shape[:2]))
    if shrink < 1.0:
        square = cv2.resize(square, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(square), x0, y0, shrink
