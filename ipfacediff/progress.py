"""Rich progress bars behind the library's ``progress(stage, done, total)`` callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bars(console: Console) -> Iterator:
    """One bar per stage, created when the stage first reports; silent when ``console`` is not a
    terminal (logs and tests get no bar noise). A long clip's windows ("edit window 2/5") reuse
    their stage's bar, started afresh; the "windows" bar's remaining time is the whole edit's."""
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
            bar = stage.split(" window ")[0]
            if bar not in tasks:
                tasks[bar] = bars.add_task(stage, total=total)
            elif shown[bar] != stage:  # the next window
                bars.reset(tasks[bar], total=total, description=stage)
            shown[bar] = stage
            bars.update(tasks[bar], completed=done, total=total)

        yield update
