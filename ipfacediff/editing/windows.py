"""Windows: the one place where a long clip's parts meet.

A clip of more than ``settings.window`` frames is edited window by window (:func:`edit_windows`),
so that memory holds one window's inversion whatever the clip's length. The first window picks
:data:`ANCHOR_KEYFRAMES` anchor keyframes and records their edited latents at every step; every
later window's keyframe batches attend to them (:class:`Anchors`), so all windows draw the same
edit, and two windows' edits of the frames they share are cross-faded. The stages below see a
window as its frames only; :class:`EditWindow` adds the anchors' rows where a batch needs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ipfacediff.diffusion import InvertedVideo, Progress, chunk_bounds, select_rows
from ipfacediff.editing.propagation import select_keyframes
from ipfacediff.progress import Stage, window_of
from ipfacediff.settings import EditSettings

# Keyframes of the first window of a long clip that every later window's keyframe batches attend
# to, so that all windows draw the same edit.
ANCHOR_KEYFRAMES = 2


@dataclass
class Anchors:
    """The first window's anchor keyframes, which every later window's keyframe batches attend
    to: their crops, their source inversion and their edited latents at every step (a few frames:
    small next to a window)."""

    frames: np.ndarray
    source: InvertedVideo
    edits: dict[int, torch.Tensor]


@dataclass
class EditWindow:
    """One window of a clip edited in several (:func:`edit_windows`): which it is and where its
    frames lie (``begin``, ``end``), the keyframes it draws per step (None: as the settings say),
    the anchors its keyframe batches attend to (None in the first window and in a short clip), and
    in the first window the rows made anchors, whose edited latents it records.

    The stages see only the window's own frames; the anchors' rows go in front of each keyframe
    batch through :meth:`batch_rows` (their edited latents at the step), :meth:`batch_sources`
    (their source latents) and :meth:`batch_targets` (their identities), and ε2's output rows of a
    batch start after :attr:`anchor_rows` of them."""

    index: int = 0
    keyframes: int | None = None
    anchors: Anchors | None = None
    record: list[int] = field(default_factory=list)
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)
    begin: int = 0
    end: int = 0
    progress: Progress | None = None
    known: torch.Tensor | None = (
        None  # the local blend's prompt differences of the frames shared with the window before
    )
    anchor_targets: torch.Tensor | None = None  # the anchors' source identities, measured with the window's

    def seed(self, seed: int) -> int:
        """The keyframe draws' seed: the edit's in the first window (a short clip's draws are the
        same as ever), another for each later one."""
        return seed if self.index == 0 else (seed + 1_000_003 * self.index) % 2**63

    @property
    def anchor_rows(self) -> int:
        """Rows of every keyframe batch that are anchors (in front of the window's keyframes)."""
        return 0 if self.anchors is None else len(self.anchors.frames)

    def batch_rows(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        """A keyframe batch's edited latents at ``step``, the anchors' recorded ones in front."""
        return rows if self.anchors is None else torch.cat([self.anchors.edits[step], rows])

    def batch_sources(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        """A keyframe batch's source latents at ``step``, the anchors' in front."""
        return rows if self.anchors is None else torch.cat([self.anchors.source.latents[step], rows])

    def batch_targets(self, rows: torch.Tensor) -> torch.Tensor:
        """A keyframe batch's source identities, the anchors' in front."""
        return rows if self.anchors is None else torch.cat([self.anchor_targets, rows])

    def keyframes_at(self, chosen: list[int]) -> list[int]:
        """The keyframes of a step: in the first window of several, its anchors at every step."""
        return sorted(set(chosen) | set(self.record)) if self.record else chosen

    def record_step(self, step: int, edited: torch.Tensor) -> None:
        """Keep the anchors' edited latents at ``step`` (the first window of several)."""
        if self.record:
            self.recorded[step] = edited[self.record].clone()

    def faces(self, frames: np.ndarray) -> np.ndarray:
        """The crops whose identities guide the window: its frames, then the anchors'."""
        return frames if self.anchors is None else np.concatenate([frames, self.anchors.frames])

    def split_identities(self, identities: torch.Tensor) -> torch.Tensor:
        """The window's frames' rows of ``identities`` (of :meth:`faces`); the anchors' are kept."""
        if self.anchors is None:
            return identities
        count = len(identities) - self.anchor_rows
        self.anchor_targets = identities[count:]
        return identities[:count]


def window_plan(number: int, windows: list[tuple[int, int]], settings: EditSettings, total: int) -> EditWindow:
    """The :class:`EditWindow` of window ``number``: keyframes asked for by count are shared out
    by length, and the first of several windows picks :data:`ANCHOR_KEYFRAMES` anchors."""
    if len(windows) == 1:
        return EditWindow(begin=windows[0][0], end=windows[0][1])
    begin, end = windows[number]
    keyframes = max(1, round(settings.keyframes * (end - begin) / total)) if settings.keyframes else None
    record = select_keyframes(end - begin, ANCHOR_KEYFRAMES) if number == 0 and not settings.every_frame else []
    return EditWindow(index=number, keyframes=keyframes, record=record, begin=begin, end=end)


class ClipWindows:
    """The windows of one clip's edit and what passes from one window to the next: the anchors,
    the window before's edit of the frames they share (cross-faded into the next), the local
    blend's prompt differences of those frames, the keyframes of every step, and the share of
    the inversion read from the cache.

    Iterating gives each window's :class:`EditWindow`; :meth:`finish` takes its edit and says which
    of its latents are final (the rest is the next window's to fade into).
    """

    def __init__(
        self,
        numbers: Sequence[int],
        settings: EditSettings,
        progress: Progress | None = None,
        *,
        keep_latents: bool = True,
    ):
        self.bounds = edit_windows(chunk_bounds(numbers), settings.window)
        self.settings, self.total, self.progress = settings, len(numbers), progress
        self.anchors: Anchors | None = None
        self.pending: torch.Tensor | None = None  # the window before's edit of the overlap, faded out
        self.known: torch.Tensor | None = None  # the local blend's prompt differences of the overlap
        # The clip's final latents, filled window by window (None: not kept). One tensor, not a list
        # of the windows' rows: a window's rows would hold its whole edit, overlap included, and
        # joining them would hold the clip's latents twice.
        self.keep_latents = keep_latents
        self.latents: torch.Tensor | None = None
        self.history: list[list[int]] = []
        self.reused = 0

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[EditWindow]:
        count = len(self.bounds)
        for number in range(count):
            if self.progress and count > 1:
                self.progress("windows", number, count)
            window = window_plan(number, self.bounds, self.settings, self.total)
            window.anchors, window.known = self.anchors, self.known
            window.progress = window_progress(self.progress, number, count)
            yield window
        if self.progress and count > 1:
            self.progress("windows", count, count)

    def finish(
        self,
        window: EditWindow,
        frames: np.ndarray,
        edited: torch.Tensor,
        inverted: InvertedVideo,
        difference: torch.Tensor | None,
        keyframes: list[list[int]],
    ) -> torch.Tensor:
        """Take window ``window``'s edited latents (of its ``frames``, changed in place where the
        window before fades out), its inversion, prompt differences and keyframes of every step;
        returns the latents that are final: all but those the next window shares."""
        number, begin, end = window.index, window.begin, window.end
        if window.record:
            self.anchors = Anchors(frames[window.record], select_rows(inverted, window.record), window.recorded)
        if self.pending is not None:
            edited[: len(self.pending)] = cross_fade(self.pending, edited[: len(self.pending)])
        keep = self.bounds[number + 1][0] - begin if number + 1 < len(self.bounds) else end - begin
        self.pending = edited[keep:].clone() if keep < end - begin else None
        self.known = difference[keep:].clone() if difference is not None and self.pending is not None else None
        if self.keep_latents:
            if self.latents is None:
                self.latents = edited.new_empty((self.total, *edited.shape[1:]))
            self.latents[begin : begin + keep] = edited[:keep]
        self.reused += sum(r * (b2 - b1) for b1, b2, _, r in inverted.chunks if number == 0 or b1 > 0)
        for step, keys in enumerate(keyframes):
            if step == len(self.history):
                self.history.append([])
            self.history[step] = sorted(set(self.history[step]) | {begin + k for k in keys})
        return edited[:keep]


def edit_windows(chunks: list[tuple[int, int]], window: int) -> list[tuple[int, int]]:
    """(start, end) positions of the windows a clip is edited in: runs of whole cache chunks
    (:func:`~ipfacediff.diffusion.chunk_bounds`) of at most ``window`` frames, each after the first
    starting with the last chunk of the one before, over which the two windows' edits are
    cross-faded (:func:`cross_fade`). A clip of ``window`` frames or fewer is one window."""
    if chunks[-1][1] - chunks[0][0] <= window:
        return [(chunks[0][0], chunks[-1][1])]
    windows, first = [], 0
    while True:
        last = first
        while last + 1 < len(chunks) and chunks[last + 1][1] - chunks[first][0] <= window:
            last += 1
        windows.append((chunks[first][0], chunks[last][1]))
        if last == len(chunks) - 1:
            return windows
        first = last if last > first else last + 1  # a window of one chunk cannot share it


def cross_fade(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Two windows' edited latents of the frames they share, the first window's giving way to the
    second's frame by frame, so that neither window's edit stops at a hard border."""
    weight = torch.arange(1, len(before) + 1, dtype=before.dtype) / (len(before) + 1)
    return before + weight.view(-1, *[1] * (before.dim() - 1)) * (after - before)


def release_pages(array: object) -> None:
    """Drop a shared memory map's pages (:class:`numpy.memmap`, modes r, r+, w+) from this process:
    the data stays in the file and the page cache, but a long clip's crops, read and written a
    window at a time, no longer count in full against the process's memory (or its container's
    limit). Anything else is left alone; a copy-on-write map (mode c) would lose its changes."""
    import mmap

    shared = getattr(array, "_mmap", None)
    if (
        isinstance(array, np.memmap)
        and array.mode in ("r", "r+", "w+")
        and shared is not None
        and hasattr(shared, "madvise")
    ):
        shared.madvise(mmap.MADV_DONTNEED)


def window_progress(progress: Progress | None, number: int, count: int) -> Progress | None:
    """The progress of one window's stages, reported as a :class:`~ipfacediff.progress.Stage` of the
    window ("edit window 2/5") when the clip has several."""
    if progress is None or count == 1:
        return progress
    return lambda stage, done, total: progress(Stage(window_of(stage)[0], number, count), done, total)


def keyframe_batches(keyframes: list[int], size: int, *, anchored: bool) -> list[list[int]]:
    """Split keyframes into batches of at most ``size``; with ``anchored`` every later batch also
    carries the first keyframe, so all batches attend to one shared frame and agree.

    This keeps memory flat in the number of keyframes (and so in the video's length).
    """
    if len(keyframes) <= size or not anchored:
        return [keyframes[i : i + size] for i in range(0, len(keyframes), size)]
    anchor, rest = keyframes[0], keyframes[size:]
    return [keyframes[:size]] + [[anchor] + rest[i : i + size - 1] for i in range(0, len(rest), size - 1)]
