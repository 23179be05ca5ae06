"""What is in front of a face: occlusion masks in the aligned crop, per frame of a face's track.

The paste-back adds the edit's change to the frame under the face mask, and the face mask is the
face's outline: a hand passing the eyes, a microphone before the mouth lie inside it, so without
an occlusion mask the edit paints eyeglasses onto the hand and a beard onto the microphone. An
occlusion mask (1 where something covers the face) takes those pixels out of the paste-back, so
they keep the frame exactly; the edit is given the face behind them, so it is not spent on the
occluder either, and its keyframes are frames whose edit can be seen.

Hands come from mediapipe's hand landmarker (the palm detector and the 21-point hand model the
wheel bundles), run on a square of the frame around the face: a hand is the filled hull of its
palm points with the fingers drawn as thick segments, grown by a margin and feathered outwards,
so the hand itself is covered with weight 1 and the fade lies on the face. Then the face's track
(:func:`track_occlusion`) adds what its other frames tell: hands carried over frames where the
landmarker lost them, and what differs from the face's own look (each pixel's median over the
neighbouring frames), near a hand or, anywhere on the face, as one solid region. What stays in
front of the face the whole time (a microphone held still at the mouth) is part of that look: it
is found by the model set's occluder segmenter (:mod:`ipfacediff.models.segmenter`) where the
model ships one, for the faces of its world (the embedded FaceWorld model does; benchmarks/README.md
has the figures, and why a segmenter for real faces could not be trained here).

The edit itself is given the face behind what covers it (:func:`face_behind_occluders`: the
face's other frames there, or the identity model's painting where none shows it), and the
paste-back adds only the edit's change to the frame's own crop.

mediapipe is imported where it is used, as in :mod:`ipfacediff.face`.
"""

from __future__ import annotations

import atexit
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from ipfacediff.models.segmenter import OccluderSegmenter

# What the masks are made from, as .run.json records it.
OCCLUSION_METHOD = "hands+look"

# The hand landmarker looks at the square this many times the crop's side in the frame, around the
# crop's centre: a hand that reaches into the crop has its palm outside it more often than not.
HAND_CONTEXT = 2.0
# That square is shrunk to at most this side (the palm detector looks at 192 px anyway).
HAND_MAX_SIDE = 512
HAND_MIN_CONFIDENCE = 0.5
# Where the first look finds no hand, the second looks at the square shrunk to at most this side.
HAND_SECOND_SIDE = 128
# The two looks: (image mode, the square's largest side); the first in video mode, tracking.
HAND_LOOKS = ((False, HAND_MAX_SIDE), (True, HAND_SECOND_SIDE))
# While no hand is near, a look is not run again on a frame whose square (at HAND_STILL_SIDE) has
# fewer than HAND_STILL_SHARE of its pixels changed by more than HAND_STILL_LEVELS (in some channel)
# from the square that look last found no hand in. A hand over an eighth of the crop is a 32nd of it.
HAND_STILL_SIDE = 32
HAND_STILL_LEVELS = 24
HAND_STILL_SHARE = 0.03
# While no hand is near, a look runs on every HAND_IDLE_STRIDE-th frame of a face, the two in
# turn; a hand found after frames without is looked for back over at most HAND_LOOK_BACK frames
# before it, in the looks they missed.
HAND_IDLE_STRIDE = 3
HAND_LOOK_BACK = 16
# A face's frames between two with hands, at most this many, get hands carried over from both.
HAND_GAP = 2
# Within this many frames of a hand, and inside its hull grown by HAND_GATE palms, the region takes
# in what differs from the face's own look (its pixel's median over LOOK_WINDOW frames either side)
# by more than LOOK_THRESHOLD levels in some channel, compared in a crop of LOOK_SIDE; the pixels
# taken grow by LOOK_MARGIN and fade over LOOK_FEATHER pixels of that crop.
HAND_REACH = 3
HAND_GATE = 0.6
LOOK_SIDE = 64
LOOK_WINDOW = 16
LOOK_STRIDE = 2  # every other frame of the window goes into the median
LOOK_THRESHOLD = 16
LOOK_MARGIN = 1.5
LOOK_FEATHER = 2.5
# Anything else in front of the face: a region that differs from the face's look by more than this
# many levels, of at least OBJECT_AREA of the face and OBJECT_THICKNESS of the crop thick.
OBJECT_THRESHOLD = 30
OBJECT_AREA = 0.03
OBJECT_THICKNESS = 0.07
# The look is found again this many times, each time without what the last found: an occluder
# that moves slowly is part of the first median.
LOOK_PASSES = 2

# The segmenter's regions count where it marks them in most of the frames this near (held_over_time).
HELD_REACH = 2
# They grow by HELD_MARGIN and fade over HELD_FEATHER pixels of LOOK_SIDE: what the segmenter marks
# already reaches past the object's edge, and a microphone at the mouth leaves little of it.
HELD_MARGIN = 0.0
HELD_FEATHER = 1.0

# The face behind an occluder, for the edit: a frame's pixel shows the face there where its mask
# is below this.
FACE_SEEN = 0.05

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
# The heel of the palm bulges past the wrist-to-little-finger line: the region takes in a point this
# far (palms) outside that line. A hand in front of the face may have its forearm there too, or may
# not (a hand that reaches in from the side, a drawn one): the look is asked (_hand_gate) over a
# forearm this long and wide beyond the wrist, and covers it where it differs from the face; the
# first HAND_WRIST_LENGTH of it is the wrist and the palm's base below the wrist point, covered.
HAND_HEEL = 0.25
HAND_FOREARM_LENGTH = 1.0
HAND_FOREARM_WIDTH = 0.9
HAND_WRIST_LENGTH = 0.35
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
        wrist = points[0] + HAND_WRIST_LENGTH * (points[0] - points[9])
        cv2.polylines(
            shape,
            [np.round(np.array([points[0], wrist]) * 16).astype(np.int32)],
            False,
            1,
            thickness=max(1, round(HAND_FOREARM_WIDTH * palm + 2 * margin)),
            shift=4,
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


# Image-mode hand landmarkers that finders have closed: one keeps nothing from an image to the next,
# so a later finder in this process takes one over instead of making its own (making one and its
# first run cost as much as two more runs). Each is used by one finder at a time.
_IMAGE_LANDMARKERS: list = []
_IMAGE_LOCK = threading.Lock()


def _hand_landmarker(static: bool):
    from mediapipe.python.solutions import hands

    return hands.Hands(
        static_image_mode=static,
        max_num_hands=2,
        model_complexity=1,
        min_detection_confidence=HAND_MIN_CONFIDENCE,
        min_tracking_confidence=HAND_MIN_CONFIDENCE,
    )


@atexit.register
def _close_image_landmarkers() -> None:
    with _IMAGE_LOCK:
        while _IMAGE_LANDMARKERS:
            _IMAGE_LANDMARKERS.pop().close()


class OcclusionFinder:
    """The hands in front of the faces of one pass over a video (``with OcclusionFinder() as finder``).

    Each face (``key``: its track id) has its own hand landmarker, made on first use, in
    mediapipe's video mode: a hand found once is followed from its last landmarks, which finds it
    in frames where the palm detector alone misses it (a palm turned or cut by the square's edge).
    Where that finds nothing, a second landmarker in image mode (one for all faces) looks at the
    square shrunk to HAND_SECOND_SIDE: at that scale a flat, drawn or blurred hand looks like the
    hands the palm detector knows. Each run of the palm detector costs the same whatever the
    square's side, and most frames have no hand: so while no hand was found in a face's last
    HAND_REACH frames, one of the two looks runs in every HAND_IDLE_STRIDE-th frame, in turn, and
    when one finds a hand the frames before it are looked at in image mode in the looks they
    missed (:meth:`_look_back`; :meth:`look` keeps a face's hands by frame): a hand comes in over
    frames, and is found from the first it is in, and one the landmarker finds in every other
    frame only is found in each of those. A face's last frames are looked back at from its last
    when the finder closes. Nor is a look run again, while no hand is near, on a square that has
    not changed since it found no hand there (HAND_STILL_SHARE), or the other look on a square
    small enough that both see it alike: a detector finds what it found in the same pixels. A
    face's frames go in in order."""

    def __init__(self) -> None:
        self._trackers: dict[int, object] = {}  # by face: its video-mode landmarker
        self._image = None  # the image-mode landmarker, taken from _IMAGE_LANDMARKERS on first use
        self._since_hand: dict[int, int] = {}  # by face: frames since one had a hand
        self._turn: dict[int, int] = {}  # by face: its frames while no hand was near
        # By face: its last frames while no hand was found (at most HAND_LOOK_BACK, consecutive,
        # newest last): each one's number and the squares (:func:`_context_square`) of the looks it missed.
        self._behind: dict[int, list[tuple[int, list[tuple]]]] = {}
        self._found: dict[int, dict[int, list[np.ndarray]]] = {}  # by face: the hands by frame it is given
        # By face and look: the square (at HAND_STILL_SIDE) where that look last found no hand.
        self._still: dict[tuple[int, int], np.ndarray] = {}

    def __enter__(self) -> OcclusionFinder:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        """Look back from each face's last frame over those its last looks left behind (its track
        ends there, or the video: no later look sends one back), then close the trackers and give
        the image-mode landmarker back for the next finder."""
        for key in list(self._behind):
            self._look_back(self._found[key], key, misses_allowed=0)
        for graph in self._trackers.values():
            graph.close()
        self._trackers.clear()
        if self._image is not None:
            with _IMAGE_LOCK:
                _IMAGE_LANDMARKERS.append(self._image)
            self._image = None

    def _graph(self, key: int, static: bool):
        """The face's own tracking landmarker, or (``static``) the finder's image-mode one."""
        if static:
            if self._image is None:
                with _IMAGE_LOCK:
                    closed = _IMAGE_LANDMARKERS.pop() if _IMAGE_LANDMARKERS else None
                self._image = closed if closed is not None else _hand_landmarker(static=True)
            return self._image
        if key not in self._trackers:
            self._trackers[key] = _hand_landmarker(static=False)
        return self._trackers[key]

    def _run(self, key: int, static: bool, region: tuple) -> list[np.ndarray]:
        square, x0, y0, shrink = region
        result = self._graph(key, static).process(square)
        return [
            np.array([(p.x, p.y) for p in hand.landmark]) * [square.shape[1], square.shape[0]] / shrink + [x0, y0]
            for hand in result.multi_hand_landmarks or []
        ]

    def look(
        self, found: dict[int, list[np.ndarray]], index: int, frame: np.ndarray, M: np.ndarray, size: int, key: int = 0
    ) -> None:
        """Put the hands near the face of crop transform ``M`` (side ``size``) in frame ``index``
        into ``found`` (that face's hands by frame: (21, 2) points each, in frame pixels), and
        where they are the first after frames without, the hands of the frames before that the
        looks they missed find (:meth:`_look_back`)."""
        self._found[key] = found
        since = self._since_hand.get(key, HAND_REACH + 1)
        if since <= HAND_REACH:  # a hand is near: both looks, every frame
            self._behind.pop(key, None)
            for which in range(len(HAND_LOOKS)):
                self._still.pop((key, which), None)
            found[index] = self._first_found(key, frame, M, size, HAND_LOOKS)[0]
            self._since_hand[key] = 0 if found[index] else since + 1
            return
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        still = _still_square(frame, M, size)
        missed, hands = list(range(len(HAND_LOOKS))), []
        if turn % HAND_IDLE_STRIDE == 0:
            which = turn // HAND_IDLE_STRIDE % 2
            missed.remove(which)
            if not self._unchanged(key, which, still):
                hands, region = self._first_found(key, frame, M, size, HAND_LOOKS[which : which + 1])
                alike = region is not None and _seen_alike(region)
                if hands:
                    for seen in range(len(HAND_LOOKS)):
                        self._still.pop((key, seen), None)
                elif still is not None:
                    for seen in range(len(HAND_LOOKS)) if alike else [which]:
                        self._still[key, seen] = still
                if alike:
                    missed = []
        found[index] = hands
        if hands:
            self._look_back(found, key)
        else:
            self._keep_behind(key, index, frame, M, size, missed, still)
        self._since_hand[key] = 0 if hands else since + 1

    def _unchanged(self, key: int, which: int, still: np.ndarray | None) -> bool:
        """Whether look ``which`` last found no hand in this face's square as it is now (``still``)."""
        last = self._still.get((key, which))
        return still is not None and last is not None and _changed_share(still, last) < HAND_STILL_SHARE

    def _keep_behind(
        self,
        key: int,
        index: int,
        frame: np.ndarray,
        M: np.ndarray,
        size: int,
        missed: Sequence[int],
        still: np.ndarray | None,
    ) -> None:
        """Keep frame ``index`` (no hand found in it) for :meth:`_look_back`, with its squares of
        the looks ``missed`` (their places in HAND_LOOKS) but those whose square is as that look
        last found no hand in."""
        squares = []
        for which in missed:
            if self._unchanged(key, which, still):
                continue
            region = _context_square(frame, M, size, HAND_LOOKS[which][1])
            if region is None:
                break
            squares.append((region[0].copy(), *region[1:]))  # the caller's frame may be written over
            if _seen_alike(region):
                break
        behind = self._behind.setdefault(key, [])
        if behind and behind[-1][0] != index - 1:
            behind.clear()
        behind.append((index, squares))
        del behind[:-HAND_LOOK_BACK]

    def _look_back(self, found: dict[int, list[np.ndarray]], key: int, misses_allowed: int = HAND_GAP) -> None:
        """The hands of the frames kept behind (those before the one just found with hands, or a
        face's last ones), newest first, each in the looks it missed, in image mode (the tracker goes
        on undisturbed), until more than ``misses_allowed`` in a row have none. From a hand found,
        HAND_GAP: a hand before those would not be carried over to the ones after
        (:func:`fill_hand_gaps`). From a face's last frame, none: no hand found there or just
        before it means none came in that is still in front of the face."""
        misses = 0
        for index, squares in reversed(self._behind.pop(key, [])):
            hands = self._first_in(key, squares)
            if hands:
                found[index], misses = hands, 0
            else:
                misses += 1
                if misses > misses_allowed:
                    return

    def _first_in(self, key: int, squares: list[tuple]) -> list[np.ndarray]:
        """The hands the image-mode landmarker finds in the first of ``squares`` that has any."""
        for square in squares:
            hands = self._run(key, True, square)
            if hands:
                return hands
        return []

    def _first_found(
        self, key: int, frame: np.ndarray, M: np.ndarray, size: int, looks: Sequence[tuple[bool, int]]
    ) -> tuple[list[np.ndarray], tuple | None]:
        """The hands of the first of ``looks`` that finds any, and the square it looked at last
        (None: the face's context square leaves the frame)."""
        hands: list[np.ndarray] = []
        region = None
        for static, side in looks:
            region = _context_square(frame, M, size, side)
            if region is None:
                break
            hands = self._run(key, static, region)
            if hands:
                break
        return hands, region

    def hands(self, frame: np.ndarray, M: np.ndarray, size: int, key: int = 0) -> list[np.ndarray]:
        """The hands near the face of crop transform ``M`` (side ``size``) in this frame alone, both
        looks tried: (21, 2) points each, in frame pixels (:meth:`look` keeps a face's frames)."""
        return self._first_found(key, frame, M, size, HAND_LOOKS)[0]

    def mask(self, frame: np.ndarray, M: np.ndarray, size: int, key: int = 0) -> np.ndarray:
        """(size, size) float32 occlusion mask of this frame alone in the crop of ``M``: 1 where
        a hand is in front of the face (:func:`track_occlusion` adds what a face's other frames
        tell)."""
        return hand_region([to_crop(M, points) for points in self.hands(frame, M, size, key)], size)


def fill_hand_gaps(hands: dict[int, list[np.ndarray]]) -> dict[int, list[np.ndarray]]:
    """A face's hands by frame with the frames of a short gap (at most HAND_GAP frames between two
    frames with hands) given hands interpolated between both sides: a hand moving across a face is
    there in the frames the landmarker lost it."""
    filled = dict(hands)
    seen = [f for f in sorted(hands) if hands[f]]
    for a, b in zip(seen, seen[1:]):
        if not 1 < b - a <= HAND_GAP + 1:
            continue
        for f in range(a + 1, b):
            if f not in filled or filled[f]:
                continue
            t = (f - a) / (b - a)
            if len(hands[a]) == len(hands[b]):
                filled[f] = [(1 - t) * p + t * q for p, q in zip(hands[a], hands[b])]
            else:
                filled[f] = [*hands[a], *hands[b]]
    return filled


def track_occlusion(
    hands: dict[int, list[np.ndarray]],
    transforms: dict[int, np.ndarray],
    crop_of: Callable[[int], np.ndarray],
    size: int,
    face_of: Callable[[int], np.ndarray],
    held: dict[int, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """One face's occlusion masks (size, size) float32 by frame, from its hands by frame (frame
    pixels, :meth:`OcclusionFinder.hands`), its frame → crop transforms (side ``size``), its
    aligned crops (``crop_of(frame)``, any side), its face masks (``face_of(frame)`` at
    LOOK_SIDE) and, where the model set has an occluder segmenter, the regions it marks (``held``:
    uint8 at LOOK_SIDE by frame, :meth:`~ipfacediff.models.segmenter.OccluderSegmenter.regions`).

    Both go by the face's own look: each pixel's median over the LOOK_WINDOW frames either side in
    the aligned crop (hands' regions left out), which is the face as it is while things pass in
    front of it. A drawn hand, a hand seen edge-on or blurred, is found in most frames but not all,
    and its 21 points are joint centres that a cartoon's or a blurred hand's outline need not
    follow: so hands are carried over short gaps (:func:`fill_hand_gaps`), and near a hand (within
    HAND_REACH frames of one, inside its hull grown by HAND_GATE palms) what differs from the look
    by LOOK_THRESHOLD is covered too. Anything else (a cup raised to the mouth, a board passing)
    is covered where it differs from the look by OBJECT_THRESHOLD over one region of at least
    OBJECT_AREA of the face: an expression, a blink, a mouth opening or a head turn in the aligned
    crop changes less, or in small pieces. An occluder held still in front of the face for the
    whole window (a microphone at the mouth) is part of the look and is not found by it: the
    segmenter's regions are, and like the hands they are left out of the look (all it marks, also
    what :func:`held_over_time` does not keep as occlusion)."""
    hands = fill_hand_gaps(hands)
    frames = sorted(transforms)
    found = {f: hand_region([to_crop(transforms[f], p) for p in hands.get(f, [])], size) for f in frames}
    for f, region in held_over_time(held or {}).items():
        if f in found and region.any():
            found[f] = np.maximum(found[f], grown_region(region, size, HELD_MARGIN, HELD_FEATHER))
    if not frames:
        return found
    gates = {f: _hand_gate(hands, transforms[f] * (LOOK_SIDE / size), f) for f in frames}
    # Everything the segmenter marks stays out of the look, its slips included: a board it marks in
    # part of its frames would otherwise pull the median of a clean frame's pixels halfway to it.
    suspected = {f: region for f, region in (held or {}).items() if f in found and region.any()}
    masks = found
    for _ in range(LOOK_PASSES):  # each pass leaves what the last one covered out of the look
        covered, masks = masks, _look_pass(frames, masks, found, crop_of, face_of, gates, size, suspected)
        if all(np.array_equal(masks[f], covered[f]) for f in frames):  # a pass more finds the same
            break
    return masks


def segmented_regions(
    segmenter: OccluderSegmenter,
    frames: Sequence[int],
    crop_of: Callable[[int], np.ndarray],
    face_of: Callable[[int], np.ndarray],
    batch: int = 64,
) -> dict[int, np.ndarray]:
    """``segmenter``'s regions (uint8 at LOOK_SIDE) of the frames' crops (``crop_of(frame)``),
    bounded by their face masks (``face_of(frame)`` at LOOK_SIDE), a batch of frames at a time."""
    side = segmenter.config.side
    out = {}
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        faces = [face_of(f) for f in chunk]
        if side != LOOK_SIDE:
            faces = [cv2.resize(face, (side, side), interpolation=cv2.INTER_LINEAR) for face in faces]
        regions = segmenter.regions(np.stack([np.asarray(crop_of(f)) for f in chunk]), np.stack(faces))
        for f, region in zip(chunk, regions):
            if side != LOOK_SIDE:
                region = cv2.resize(region, (LOOK_SIDE, LOOK_SIDE), interpolation=cv2.INTER_NEAREST)
            out[f] = region
    return out


def held_over_time(held: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The segmenter's regions by frame (uint8) where it marks them in most of the frames within
    HELD_REACH either side: what is held in front of the face stays there for frames, while the
    segmenter's slips (a lock of hair over a forehead in one frame) do not; a thing that moves in
    and out is found by the face's look."""
    frames = sorted(held)
    out = {}
    for k, f in enumerate(frames):
        near = [held[g] for g in frames[max(0, k - HELD_REACH) : k + HELD_REACH + 1] if abs(g - f) <= HELD_REACH]
        if not held[f].any():
            out[f] = held[f]
            continue
        votes = np.sum([n > 0 for n in near], axis=0)
        out[f] = ((held[f] > 0) & (2 * votes > len(near))).astype(np.uint8)
    return out


def _hand_gate(hands: dict[int, list[np.ndarray]], M: np.ndarray, frame: int) -> np.ndarray:
    """uint8 (LOOK_SIDE, LOOK_SIDE): where the hands of the frames within HAND_REACH of
    ``frame`` (crop transform ``M`` at LOOK_SIDE) are, hulls grown by HAND_GATE palms, and where
    their forearms may be."""
    gate = np.zeros((LOOK_SIDE, LOOK_SIDE), np.uint8)
    for g in range(frame - HAND_REACH, frame + HAND_REACH + 1):
        for points in hands.get(g, []):
            inside = to_crop(M, points)
            palm = max(1.0, float(np.linalg.norm(inside[9] - inside[0])))
            hull = cv2.convexHull(np.round(inside * 16).astype(np.int32))
            cv2.fillPoly(gate, [hull], 1, shift=4)
            cv2.polylines(gate, [hull], True, 1, thickness=max(1, round(2 * HAND_GATE * palm)), shift=4)
            elbow = inside[0] + HAND_FOREARM_LENGTH * (inside[0] - inside[9])
            forearm = np.round(np.array([inside[0], elbow]) * 16).astype(np.int32)
            thickness = max(1, round((HAND_FOREARM_WIDTH + 2 * HAND_GATE) * palm))
            cv2.polylines(gate, [forearm], False, 1, thickness=thickness, shift=4)
    return gate


def _look_pass(
    frames: list[int],
    covered: dict[int, np.ndarray],
    found: dict[int, np.ndarray],
    crop_of: Callable[[int], np.ndarray],
    face_of: Callable[[int], np.ndarray],
    gates: dict[int, np.ndarray],
    size: int,
    suspected: dict[int, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """``found`` (the hands' and the segmenter's masks) with what differs from the face's look
    added, the look being each pixel's median over the window with ``covered`` (the last pass's
    masks, ``found`` in the first) and ``suspected`` (uint8 at LOOK_SIDE by frame) left out (see
    :func:`track_occlusion`). A pass decides afresh wherever its look is known: a clean frame that
    differed from a first look with a hand the landmarker missed in it is not marked again; where
    no frame of the window shows a pixel, the last pass's mark stands."""
    looks: dict[int, np.ndarray] = {}
    opening = np.ones((2, 2), np.uint8)
    out = {}

    def look(frame: int) -> np.ndarray:
        if frame not in looks:
            crop = cv2.resize(np.asarray(crop_of(frame)), (LOOK_SIDE, LOOK_SIDE), interpolation=cv2.INTER_AREA)
            crop = crop.astype(np.float32)
            crop[cv2.resize(covered[frame], (LOOK_SIDE, LOOK_SIDE), interpolation=cv2.INTER_AREA) > 0] = np.nan
            if suspected and frame in suspected:
                crop[suspected[frame] > 0] = np.nan
            looks[frame] = crop
        return looks[frame]

    for f in frames:
        for old in [g for g in looks if g < f - LOOK_WINDOW]:
            del looks[old]
        window = np.stack([look(g) for g in frames if abs(g - f) <= LOOK_WINDOW and (g - f) % LOOK_STRIDE == 0])
        reference = _median_of_seen(window)
        crop = cv2.resize(np.asarray(crop_of(f)), (LOOK_SIDE, LOOK_SIDE), interpolation=cv2.INTER_AREA)
        differs = np.nan_to_num(np.abs(crop.astype(np.float32) - reference), nan=0.0).max(axis=-1)
        face = face_of(f) > 0
        picked = _large_regions(
            cv2.morphologyEx((differs > OBJECT_THRESHOLD).astype(np.uint8), cv2.MORPH_OPEN, opening), face
        )
        if gates[f].any():
            near = cv2.morphologyEx((differs > LOOK_THRESHOLD).astype(np.uint8), cv2.MORPH_OPEN, opening)
            held = cv2.resize(found[f], (LOOK_SIDE, LOOK_SIDE), interpolation=cv2.INTER_AREA) > 0
            picked |= _attached_regions(near & gates[f], held, face)
        out[f] = np.maximum(found[f], grown_region(picked, size)) if picked.any() else found[f]
        if covered[f] is not found[f]:  # a later pass: where its look is unknown, the last mark stands
            unknown = np.isnan(reference).any(axis=-1)
            if unknown.any():
                stands = cv2.resize(unknown.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
                out[f] = np.maximum(out[f], covered[f] * stands)
    return out


def grown_region(
    picked: np.ndarray, size: int, margin: float = LOOK_MARGIN, feather: float = LOOK_FEATHER
) -> np.ndarray:
    """(size, size) float32 mask of ``picked`` (uint8 at LOOK_SIDE): 1 over it grown by
    ``margin``, fading to 0 over ``feather`` (pixels of LOOK_SIDE) beyond."""
    picked = cv2.resize(picked, (size, size), interpolation=cv2.INTER_NEAREST)
    outside = cv2.distanceTransform(1 - picked, cv2.DIST_L2, 5) / (size / LOOK_SIDE)
    ramp = np.clip(1.0 - (outside - margin) / feather, 0.0, 1.0)
    return (ramp * ramp * (3 - 2 * ramp)).astype(np.float32)


def _median_of_seen(window: np.ndarray) -> np.ndarray:
    """Each pixel's median over axis 0 of ``window`` leaving out its NaNs (NaN where all are):
    np.nanmedian's, by one sort (NaNs sort last) rather than a median per pixel."""
    ordered = np.sort(window, axis=0)
    seen = np.count_nonzero(~np.isnan(window), axis=0)
    low = np.take_along_axis(ordered, np.maximum(seen - 1, 0)[None] // 2, axis=0)[0]
    high = np.take_along_axis(ordered, seen[None] // 2, axis=0)[0]
    return np.where(seen > 0, (low + high) / 2, np.nan).astype(window.dtype)


def _attached_regions(near: np.ndarray, held: np.ndarray, face: np.ndarray) -> np.ndarray:
    """uint8: the 8-connected regions of ``near`` (uint8) that touch ``held`` (bool: what this
    frame already covers, its hand) or are at least OBJECT_AREA of ``face`` (a hand the landmarker
    missed in this frame). Where a hand has just passed, the face's own features still differ from
    the look in small pieces apart from it (a blink, the mouth opening): they stay editable."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=8)
    if count <= 1:
        return np.zeros(near.shape, np.uint8)
    touching = np.zeros(count, bool)
    touching[np.unique(labels[cv2.dilate(held.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0])] = True
    keep = touching | (stats[:, cv2.CC_STAT_AREA] >= OBJECT_AREA * max(1, int(face.sum())))
    keep[0] = False
    return keep[labels].astype(np.uint8)


def _large_regions(differs: np.ndarray, face: np.ndarray) -> np.ndarray:
    """uint8: the 8-connected regions of ``differs`` inside ``face`` (bool) of at least
    OBJECT_AREA of the face and at least OBJECT_THICKNESS of the crop thick (twice the radius of
    the largest disc inside): a head turn moves the face's edge against the hair and backdrop, in
    thin strips along the outline, where a thing in front of the face is a solid piece."""
    inside = ((differs > 0) & face).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(inside, connectivity=8)
    if count <= 1:
        return np.zeros(differs.shape, np.uint8)
    radius = np.zeros(count, np.float32)
    np.maximum.at(radius, labels.ravel(), cv2.distanceTransform(inside, cv2.DIST_L2, 5).ravel())
    keep = (stats[:, cv2.CC_STAT_AREA] >= OBJECT_AREA * max(1, int(face.sum()))) & (
        2 * radius >= OBJECT_THICKNESS * face.shape[0]
    )
    keep[0] = False
    return keep[labels].astype(np.uint8)


def face_behind_occluders(
    crops: np.ndarray,
    occlusion: np.ndarray,
    out: np.ndarray | None = None,
    paint: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """A face's crops (N, s, s, 3) uint8 with what ``occlusion`` (N, m, m) float, 1 where covered,
    covers replaced by the face itself: each covered pixel's median over the frames within
    LOOK_WINDOW (every LOOK_STRIDE-th, as the look) that show the face there, blended in by the
    mask's weight. What no such frame shows (a microphone held still) is painted by ``paint``
    (``(crop, region) -> crop``, e.g. the pipeline's
    :meth:`~ipfacediff.editing.hidden.HiddenFaceMixin.paint_hidden`; without it, it stays as it
    is): once for each run of at most 2 LOOK_WINDOW + 1 such frames, on the one with most of it, over
    all the run's region, and copied into each frame's, so what is painted stays still while the
    occluder does. Written into ``out`` (an array shaped as ``crops``, e.g. a memory map) where given.

    ε2 edits what it is given: beside a hand it drew the eyeglasses faintly or not at all, and a
    frame the hand half covers took its edit from frames far off; given the face behind the hand it
    draws the whole edit, of which the paste-back then shows what the hand leaves seen
    (:func:`without_face_behind` takes the fill back out of the edited crops).
    """
    count, side = len(crops), crops.shape[1]
    out = np.empty_like(crops) if out is None else out
    out[:] = crops
    covered = covered_frames(occlusion)
    masks: dict[int, np.ndarray] = {}
    unseen: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (frame, ys, xs, weight) of a run

    def mask(frame: int) -> np.ndarray:
        if frame not in masks:
            masks[frame] = cv2.resize(np.asarray(occlusion[frame], np.float32), (side, side))
        return masks[frame]

    def paint_run() -> None:
        reference = max(unseen, key=lambda item: len(item[1]))[0]
        region = np.zeros((side, side), np.float32)
        for _, ys, xs, weight in unseen:
            region[ys, xs] = np.maximum(region[ys, xs], weight)
        painted = paint(np.asarray(out[reference]), region).astype(np.float32)
        for frame, ys, xs, weight in unseen:
            crop = out[frame][ys, xs].astype(np.float32)
            out[frame][ys, xs] = (
                np.clip(crop + weight[:, None] * (painted[ys, xs] - crop), 0, 255).round().astype(np.uint8)
            )
        unseen.clear()

    for f in covered:
        for old in [g for g in masks if g < f - LOOK_WINDOW]:
            del masks[old]
        weight = np.clip(mask(f), 0.0, 1.0)
        ys, xs = np.nonzero(weight > 0)
        others = [g for g in range(max(0, f - LOOK_WINDOW), min(count, f + LOOK_WINDOW + 1)) if g != f]
        others = [g for g in others if (g - f) % LOOK_STRIDE == 0]
        known = np.zeros(len(ys), bool)
        if others:
            seen = np.stack([np.asarray(crops[g])[ys, xs].astype(np.float32) for g in others])
            hidden = np.stack([mask(g)[ys, xs] >= FACE_SEEN for g in others])
            seen[hidden] = np.nan
            face = _median_of_seen(seen)
            known = ~np.isnan(face).any(axis=-1)
            crop = crops[f][ys, xs].astype(np.float32)
            w = (weight[ys, xs] * known)[:, None]
            out[f][ys, xs] = np.clip(crop + w * (np.nan_to_num(face) - crop), 0, 255).round().astype(np.uint8)
        if paint is None or known.all():
            continue
        if unseen and (f != unseen[-1][0] + 1 or f - unseen[0][0] > 2 * LOOK_WINDOW):
            paint_run()
        left = ~known
        unseen.append((f, ys[left], xs[left], weight[ys[left], xs[left]]))
    if unseen:
        paint_run()
    return out


def covered_frames(occlusion: np.ndarray) -> list[int]:
    """The frames whose occlusion mask (N, m, m) covers anything."""
    return [f for f in range(len(occlusion)) if np.asarray(occlusion[f]).max() > 0]


def without_face_behind(edited: np.ndarray, crops: np.ndarray, filled: np.ndarray, occlusion: np.ndarray) -> None:
    """Take :func:`face_behind_occluders`' fill of the frames ``occlusion`` covers back out of
    ``edited`` (N, s, s, 3) uint8 crops, in place: each becomes its frame's own crop plus the edit's
    change to the filled one, so the paste-back, which adds the change to the frame's own crop,
    pastes the edit's change and not the fill's (the face behind a hand drawn over the hand
    wherever the mask fades)."""
    for f in covered_frames(occlusion):
        if not np.array_equal(filled[f], crops[f]):
            change = edited[f].astype(np.int16) - filled[f].astype(np.int16)
            edited[f] = np.clip(crops[f].astype(np.int16) + change, 0, 255).astype(np.uint8)


def occluded_share(occlusion: np.ndarray, face: np.ndarray) -> float:
    """The share of the face mask (:func:`~ipfacediff.face.face_mask`) that ``occlusion`` covers."""
    if occlusion.shape != face.shape:
        occlusion = cv2.resize(occlusion, face.shape[::-1], interpolation=cv2.INTER_LINEAR)
    total = float(face.sum())
    return float((occlusion * face).sum()) / total if total > 0 else 0.0


def to_crop(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Frame points (n, 2) in the crop of transform ``M``."""
    return np.asarray(points, np.float64) @ M[:, :2].T + M[:, 2]


def _seen_alike(region: tuple) -> bool:
    """Whether every look sees this context square (:func:`_context_square`) as it is, unshrunk."""
    square, _, _, shrink = region
    return shrink == 1.0 and max(square.shape[:2]) <= min(side for _, side in HAND_LOOKS)


def _still_square(frame: np.ndarray, M: np.ndarray, size: int) -> np.ndarray | None:
    """The face's context square (:func:`_context_square`) at HAND_STILL_SIDE, int16."""
    region = _context_square(frame, M, size, 4 * HAND_STILL_SIDE)
    if region is None:
        return None
    square = cv2.resize(region[0], (HAND_STILL_SIDE, HAND_STILL_SIDE), interpolation=cv2.INTER_AREA)
    return square.astype(np.int16)


def _changed_share(square: np.ndarray, before: np.ndarray) -> float:
    """The share of ``square``'s pixels changed from ``before`` by more than HAND_STILL_LEVELS in some channel."""
    return float((np.abs(square - before).max(axis=-1) > HAND_STILL_LEVELS).mean())


def _context_square(
    frame: np.ndarray, M: np.ndarray, size: int, max_side: int = HAND_MAX_SIDE
) -> tuple[np.ndarray, int, int, float] | None:
    """The frame's square HAND_CONTEXT times the crop around its centre, clipped to the frame and
    shrunk to at most ``max_side``: (square, its left, its top, the shrink), or None when too
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
    shrink = min(1.0, max_side / max(square.shape[:2]))
    if shrink < 1.0:
        square = cv2.resize(square, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(square), x0, y0, shrink
