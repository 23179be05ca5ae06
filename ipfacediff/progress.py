"""Progress behind the library's ``progress(stage, done, total)`` callbacks: rich bars for the
command line, and one overall fraction with the time left for the web page."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Stage(str):
    """A stage's name as a person reads it ("edit window 2/5"), carrying the window it belongs to as
    data: ``base`` ("edit"), ``window`` (0-based) and ``windows``. A callback that only shows the
    name takes it as the string it is; the bars and :class:`OverallProgress` read the fields.
    A plain string is a stage without a window (window 0 of 1)."""

    base: str
    window: int
    windows: int

    def __new__(cls, base: str, window: int = 0, windows: int = 1) -> "Stage":
        name = f"{base} window {window + 1}/{windows}" if windows > 1 else base
        stage = super().__new__(cls, name)
        stage.base, stage.window, stage.windows = base, window, windows
        return stage


def window_of(stage: str) -> tuple[str, int, int]:
    """(stage without its window, window, windows) of a reported stage: window 0 of 1 for a plain name."""
    if isinstance(stage, Stage):
        return stage.base, stage.window, stage.windows
    return stage, 0, 1


@contextmanager
def progress_bars(console: Console) -> Iterator:
    """One bar per stage, created when the stage first reports; silent when ``console`` is not a
    terminal (logs and tests get no bar noise). A long clip's windows ("edit window 2/5", a
    :class:`Stage`) reuse their stage's bar, started afresh; the "windows" bar's remaining time is
    the whole edit's."""
    columns = (
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bars:
        tasks: dict[str, int] = {}
        shown: dict[str, str] = {}

        def update(stage: str, done: int, total: int) -> None:
            bar = window_of(stage)[0]
            if bar not in tasks:
                tasks[bar] = bars.add_task(stage, total=total)
            elif shown[bar] != stage:  # the next window
                bars.reset(tasks[bar], total=total, description=stage)
            shown[bar] = stage
            bars.update(tasks[bar], completed=done, total=total)

        yield update


# What each stage of the library's progress callbacks does, for a person watching a web page.
STAGE_WORDS = {
    "faces": "finding the faces",
    "loading models": "loading the model",
    "invert": "preparing the faces (inversion)",
    "edit region": "finding where the prompt changes the face",
    "edit": "drawing the edit",
    "write": "writing the edited video",
    "side by side": "making the side-by-side preview",
    "faces (edited)": "finding the faces in the edit",
    "evaluate": "scoring identity and flicker",
    "report": "writing the report",
}


def duration_words(seconds: float) -> str:
    """A time left as a person says it: "about 5 s", "about 2 min 30 s" (rounded to 5 s, then 10 s)."""
    if seconds < 60:
        return f"about {max(5, 5 * round(seconds / 5))} s"
    minutes, rest = divmod(10 * round(seconds / 10), 60)
    return f"about {minutes} min" + (f" {rest} s" if rest else "")


class OverallProgress:
    """One fraction for a whole run, from the per-stage ``progress(stage, done, total)`` callbacks,
    each of which starts again at 0: a person watching wants to know how far the run is and how
    long it has left, not how far the current stage is.

    ``phases``: the stages in the order they run, with their share of the run's work (relative
    weights). The ``per_face`` stages run once per edited face (``faces`` of them) and, on a long
    clip, once per window ("edit window 2/5"); a stage that goes back in that order starts the
    next face. A stage that never reports (a cached inversion) is passed over when a later one
    does. The fraction never goes back; the time left is the time so far at the pace so far.
    """

    def __init__(
        self,
        phases: Sequence[tuple[str, float]],
        *,
        per_face: Sequence[str] = (),
        faces: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stages = [stage for stage, _ in phases]
        weights = [max(0.0, float(weight)) for _, weight in phases]
        total = sum(weights) or 1.0
        self.weights = [w / total for w in weights]
        self.starts = [sum(self.weights[:i]) for i in range(len(self.weights))]
        self.block = [i for i, stage in enumerate(self.stages) if stage in per_face]
        self.faces = max(1, int(faces))
        self.clock = clock
        self.started = clock()
        self.fraction = 0.0
        self.stage = ""
        self.face = 0
        self.windows = (0, 1)
        self._last: tuple[int, int] | None = None  # (window, stage index) last seen in the per-face stages

    def update(self, stage: str, done: float, total: float) -> float:
        """Take one stage's report; returns the run's fraction done (0 to 1)."""
        base, window, windows = window_of(stage)
        self.stage = base
        if base not in self.stages:
            return self.fraction
        index = self.stages.index(base)
        part = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
        if index in self.block:
            if self._last is not None and (window, index) < self._last:
                self.face = min(self.face + 1, self.faces - 1)
            self._last = (window, index)
            self.windows = (window, windows)
            first = self.block[0]
            block_weight = sum(self.weights[i] for i in self.block)
            before = sum(self.weights[i] for i in self.block if i < index)
            within = (before + self.weights[index] * part) / block_weight if block_weight else part
            face_part = (window + within) / windows
            fraction = self.starts[first] + block_weight * (self.face + face_part) / self.faces
        else:
            fraction = self.starts[index] + self.weights[index] * part
        self.fraction = max(self.fraction, min(fraction, 1.0))
        return self.fraction

    def seconds_left(self) -> float | None:
        """The time left at the pace so far; None until there is a pace to go by."""
        elapsed = self.clock() - self.started
        if self.fraction < 0.02 or elapsed < 2.0:
            return None
        return elapsed * (1.0 - self.fraction) / self.fraction

    def text(self) -> str:
        """What the bar says: the stage in words (which face, which part of a long clip) and the time left."""
        words = STAGE_WORDS.get(self.stage, self.stage)
        if self.stage in self.stages and self.stages.index(self.stage) in self.block:
            if self.faces > 1:
                words += f", face {self.face + 1} of {self.faces}"
            if self.windows[1] > 1:
                words += f", part {self.windows[0] + 1} of {self.windows[1]}"
        left = self.seconds_left()
        return words if left is None else f"{words} · {duration_words(left)} left"
