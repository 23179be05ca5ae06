"""What every stage reports as it runs: progress callbacks and per-stage seconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances, e.g. to drive a progress bar."""

StageObserver = Callable[[str, bool], None]
"""observer(stage, entering): told as a timed stage begins (True) and as it ends (False)."""

_observers: list[StageObserver] = []


@contextmanager
def observing_stages(observer: StageObserver) -> Iterator[None]:
    """Tell ``observer`` of every stage any :class:`StageTimer` times while open, so a measurement
    beside the seconds (peak memory per stage) needs nothing passed through the pipeline."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


class StageTimer:
    """Seconds per named stage, summed over the stage's repeats.

    On a GPU the clock is read after the device has finished what the stage queued, so each stage
    is charged with its own kernels rather than the next stage's."""

    def __init__(self, device: torch.device | str | None = None, stages: tuple[str, ...] = ()):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = dict.fromkeys(stages, 0.0)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        for observer in list(_observers):
            observer(stage, True)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
            for observer in list(_observers):
                observer(stage, False)
