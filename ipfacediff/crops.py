"""A video's faces as aligned crops: found (or read) tracks, each track's crops in one array by
frame (in memory or spilled to a file), and the frame↔crop transforms to paste them back."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import cv2
import numpy as np

from ipfacediff.errors import UserError
from ipfacediff.settings import DEFAULT_WINDOW
from ipfacediff.video import VideoInfo, iter_frames

if TYPE_CHECKING:
    from ipfacediff.face import FaceTracks
    from ipfacediff.models.segmenter import OccluderSegmenter

Progress = Callable[[str, int, int], None]

# Side at which occlusion masks are kept: they are smooth (feathered), and a long clip's masks at a
# 512 crop would take 256 kB a frame.
OCCLUSION_SIDE = 128


def _whole_frame_track(info: VideoInfo):
    from ipfacediff.face import FaceTrack, FaceTracks

    box = [0.0, 0.0, float(info.width), float(info.height)]
    frames = list(range(info.frame_count))
    return FaceTracks(
        info.frame_count,
        info.width,
        info.height,
        info.fps,
        [FaceTrack(0, frames, [box] * len(frames), [np.zeros((5, 2))] * len(frames))],
    )


class CropStore(Mapping[int, np.ndarray]):
    """One face track's aligned crops by frame number, in one array in frame order: in memory,
    or with ``folder`` in a file there (a memory map), so that a long clip's crops (768 kB a frame
    at 512²) are not all held in memory. Crops are added in frame order."""

    def __init__(self, frames: Sequence[int], size: int, *, folder: Path | None = None):
        self.position = {frame: row for row, frame in enumerate(frames)}
        self.folder = folder
        shape = (max(1, len(self.position)), size, size, 3)
        if folder is None:
            self.array = np.empty(shape, np.uint8)
        else:
            path = folder / f"crops-{secrets.token_hex(6)}.npy"
            self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        self.filled: dict[int, None] = {}  # the frames whose crops are in, in order

    def __setitem__(self, frame: int, crop: np.ndarray) -> None:
        self.array[self.position[frame]] = crop
        self.filled[frame] = None

    def __getitem__(self, frame: int) -> np.ndarray:
        if frame not in self.filled:
            raise KeyError(frame)
        return self.array[self.position[frame]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.filled)

    def __len__(self) -> int:
        return len(self.filled)

    def rows(self, frames: Sequence[int]) -> np.ndarray:
        """The crops of ``frames`` (N, size, size, 3): a view of the array when they are stored
        one after another, as a range of the track is."""
        rows = [self.position[f] for f in frames]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return self.array[rows[0] : rows[0] + len(rows)]
        return self.array[rows]

    def empty_like(self, frames: Sequence[int]) -> "CropStore":
        """A store of the same kind (memory or file) for other crops of ``frames``."""
        return CropStore(frames, self.array.shape[1], folder=self.folder)


@dataclass
class FaceCrops:
    """The faces to edit: their tracks, frame→crop transforms and aligned crops, by track id."""

    tracks: FaceTracks
    transforms: dict[int, dict[int, np.ndarray]]
    crops: dict[int, dict[int, np.ndarray]]
    # What is in front of each face, by track then frame (with ``occlusion``): uint8 masks in the
    # crop at OCCLUSION_SIDE at most (:func:`occlusion_at` scales one to a crop), and their time.
    occlusion: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    occlusion_seconds: float = 0.0
    hand_frames: dict[int, set[int]] = field(default_factory=dict)  # by track: frames the landmarker found a hand in
    hands: dict[int, dict[int, list[np.ndarray]]] = field(default_factory=dict)  # by track, frame: frame points
    segmented: set[int] = field(default_factory=set)  # the tracks whose masks have the segmenter's regions

    def find_occlusion(self, segmenter: OccluderSegmenter | None = None, segment: Iterable[int] = ()) -> None:
        """Every face's occlusion masks from the hands the pass found and its own look over its
        track (:func:`occlusion_of_track`), with the regions of ``segmenter`` (the model set's
        :class:`~ipfacediff.models.segmenter.OccluderSegmenter`) for the faces in ``segment``: those the
        model's in-domain check passed, as the segmenter knows that world's faces only."""
        started = time.perf_counter()
        segment = set(segment) if segmenter is not None else set()
        self.occlusion = {
            t.id: occlusion_of_track(
                t, self.hands[t.id], self.transforms[t.id], self.crops[t.id], self.crops[t.id].array.shape[1],
                segmenter if t.id in segment else None,
            )
            for t in self.tracks.tracks
            if t.id in self.hands
        }  # fmt: skip
        self.segmented = segment & set(self.occlusion)
        self.occlusion_seconds += time.perf_counter() - started

    def occlusion_at(self, track_id: int, frame: int, size: int) -> np.ndarray | None:
        """The face's occlusion mask in ``frame`` as float32 (size, size), 1 where covered; None
        where none was looked for."""
        stored = self.occlusion.get(track_id, {}).get(frame)
        if stored is None:
            return None
        mask = stored.astype(np.float32) / 255.0
        return mask if mask.shape[0] == size else resize_image(mask, (size, size))


def face_crops(
    input_path: Path,
    info: VideoInfo,
    size: int,
    *,
    faces: str = "all",
    tracks_path: str | Path | None = None,
    whole_frame: bool = False,
    require_face: bool = False,
    progress: Progress | None = None,
    frames: range | None = None,
    spill: Path | None = None,
    in_memory: int = DEFAULT_WINDOW,
    occlusion: bool = False,
) -> FaceCrops:
    """Find (or read) the face tracks and collect every track's aligned crops in one streaming pass
    (only those of ``frames`` when given: a time range is all that is inverted and edited). With
    ``spill``, a track of more than ``in_memory`` crops keeps them in a file in that folder. With
    ``occlusion`` (aligned crops only), the hands in front of each face are looked for in the same
    pass; :meth:`FaceCrops.find_occlusion` makes the masks from them."""
    from ipfacediff.face import FaceTracks, alignment_transforms, crop_face, detect_video_faces, require_face as check

    if whole_frame:
        tracks = _whole_frame_track(info)
    elif tracks_path is not None:
        tracks = FaceTracks.load(tracks_path)
        if (tracks.width, tracks.height) != (info.width, info.height):
            raise UserError(
                f"face tracks are for {tracks.width}x{tracks.height} frames but the video is {info.width}x{info.height}"
            )
        last = max((t.frames[-1] for t in tracks.tracks if t.frames), default=-1)
        if last >= info.frame_count:
            raise UserError(
                f"face tracks reach frame {last} but {input_path.name} has {info.frame_count} frames "
                f"(0-{info.frame_count - 1}): they are for another clip"
            )
    else:
        report = (lambda done: progress("faces", done, info.frame_count)) if progress else None
        tracks = detect_video_faces(input_path, progress=report)
    if require_face:
        check(tracks, input_path)
    tracks = tracks.select(faces)
    if whole_frame:
        scale = np.array([[size / info.width, 0, 0], [0, size / info.height, 0]])
        transforms = {0: dict.fromkeys(range(info.frame_count), scale)}
    else:
        transforms = {t.id: alignment_transforms(t, size) for t in tracks.tracks}
    crops: dict[int, CropStore] = {}
    for track in tracks.tracks:
        wanted = [f for f in sorted(transforms[track.id]) if frames is None or f in frames]
        crops[track.id] = CropStore(wanted, size, folder=spill if len(wanted) > in_memory else None)
    found = FaceCrops(tracks, transforms, crops)
    finder = None
    hands: dict[int, dict[int, list[np.ndarray]]] = {}
    if occlusion and not whole_frame:
        from ipfacediff.occlusion import OcclusionFinder

        finder = OcclusionFinder()
        hands = {t.id: {} for t in tracks.tracks}
    if tracks.tracks:
        for index, frame in enumerate(iter_frames(input_path)):
            if frames is not None and index >= frames.stop:
                break
            if frames is not None and index < frames.start:
                continue
            for track in tracks.tracks:
                M = transforms[track.id].get(index)
                if M is None:
                    continue
                crops[track.id][index] = resize_image(frame, (size, size)) if whole_frame else crop_face(frame, M, size)
                if finder is not None:
                    started = time.perf_counter()
                    finder.look(hands[track.id], index, frame, M, size, key=track.id)
                    found.occlusion_seconds += time.perf_counter() - started
    if finder is not None:
        started = time.perf_counter()
        finder.close()  # it looks at the frames its last looks left behind
        found.occlusion_seconds += time.perf_counter() - started
        found.hands = hands
        found.hand_frames = {t.id: {f for f, seen in hands[t.id].items() if seen} for t in tracks.tracks}
    return found


def occlusion_of_track(
    track,
    hands: dict[int, list[np.ndarray]],
    transforms: dict[int, np.ndarray],
    crops: CropStore,
    size: int,
    segmenter: OccluderSegmenter | None = None,
) -> dict[int, np.ndarray]:
    """A track's occlusion masks (:func:`~ipfacediff.occlusion.track_occlusion`) of the frames
    whose crops are in, as uint8 at OCCLUSION_SIDE at most; with ``segmenter``, its regions too."""
    from ipfacediff.face import face_mask
    from ipfacediff.occlusion import LOOK_SIDE, segmented_regions, track_occlusion

    side = min(size, OCCLUSION_SIDE)
    scaled = {f: transforms[f] * (side / size) for f in crops}

    def face_of(frame: int) -> np.ndarray:
        return face_mask(track, frame, transforms[frame] * (LOOK_SIDE / size), LOOK_SIDE)

    held = segmented_regions(segmenter, list(crops), crops.__getitem__, face_of) if segmenter is not None else None
    masks = track_occlusion(hands, scaled, crops.__getitem__, side, face_of, held)
    return {f: np.round(mask * 255).astype(np.uint8) for f, mask in masks.items()}


def occlusion_masks(
    frames: np.ndarray | Iterable[np.ndarray],
    transforms: Sequence[np.ndarray],
    size: int,
    track=None,
    segmenter: OccluderSegmenter | None = None,
) -> np.ndarray:
    """(N, size, size) float32 occlusion masks (:func:`~ipfacediff.occlusion.track_occlusion`) of one face in N RGB
    frames (N, H, W, 3) uint8, each with its frame → crop transform (as
    :func:`~ipfacediff.face.alignment_transforms` gives them, in frame order); with ``track``
    (that face's :class:`~ipfacediff.face.FaceTrack`, covering those frames in order) its face
    masks bound what the look may cover, else the canonical face ellipse; ``segmenter``'s regions
    (:class:`~ipfacediff.models.segmenter.OccluderSegmenter`) are added where given. (Here, not in
    :mod:`ipfacediff.occlusion`, which :mod:`ipfacediff.face` imports.)"""
    from ipfacediff.face import CANONICAL_FACE_ELLIPSE, crop_face, face_mask
    from ipfacediff.occlusion import LOOK_SIDE, OcclusionFinder, segmented_regions, track_occlusion

    hands, crops, by_frame = {}, {}, {}
    with OcclusionFinder() as finder:
        for index, (frame, M) in enumerate(zip(frames, transforms, strict=True)):
            M = np.asarray(M, np.float64)
            frame = np.ascontiguousarray(frame)
            finder.look(hands, index, frame, M, size)
            crops[index] = crop_face(frame, M * (LOOK_SIDE / size), LOOK_SIDE)
            by_frame[index] = M
    if not by_frame:
        return np.zeros((0, size, size), np.float32)
    cx, cy, rx, ry = CANONICAL_FACE_ELLIPSE
    ellipse = np.zeros((LOOK_SIDE, LOOK_SIDE), np.float32)
    cv2.ellipse(
        ellipse,
        (round(cx * LOOK_SIDE), round(cy * LOOK_SIDE)),
        (round(rx * LOOK_SIDE), round(ry * LOOK_SIDE)),
        0,
        0,
        360,
        1.0,
        -1,
    )

    def face_of(i: int) -> np.ndarray:
        if track is None:
            return ellipse
        return face_mask(track, track.frames[i], by_frame[i] * (LOOK_SIDE / size), LOOK_SIDE)

    held = segmented_regions(segmenter, sorted(crops), crops.__getitem__, face_of) if segmenter is not None else None
    masks = track_occlusion(hands, by_frame, crops.__getitem__, size, face_of, held)
    return np.stack([masks[i] for i in sorted(masks)])


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    shrink = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
