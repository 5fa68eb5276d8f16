"""Progress for the user: a bar per stage with counts and ETA on a terminal, timestamped lines elsewhere.

On a terminal each stage (tiles inferred, raster written, polygons, evaluation) gets a rich bar with its
count and time remaining. Off a terminal (batch, cron, SLURM logs) the same stages write a line at most
every :data:`EVERY_S` seconds and when they end; the CLI stamps every log line with the time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("geoseg")

#: Seconds between progress lines when not on a terminal.
EVERY_S = 15.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Stage:
    """One stage's progress: ``advance(n)`` as work completes; thread-safe."""

    def __init__(self, name: str, total: int | None, unit: str, bar: Any = None, task: Any = None,
                 done: int = 0) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.done = done
        self._bar, self._task = bar, task
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._start_done = done
        self._last_line = self._start

    def advance(self, n: int = 1) -> None:
        """``n`` more units done."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
                return
            now = time.monotonic()
            if now - self._last_line >= EVERY_S and (self.total is None or self.done < self.total):
                self._last_line = now
                log.info("%s", self.line())

    def eta(self) -> float | None:
        """Seconds left at the rate since the stage started (resumed work not counted in the rate)."""
        rate_done = self.done - self._start_done
        if not self.total or rate_done <= 0:
            return None
        return (time.monotonic() - self._start) / rate_done * (self.total - self.done)

    def line(self) -> str:
        """The stage as one log line."""
        elapsed = time.monotonic() - self._start
        if not self.total:
            return f"{self.name}: {self.done:,} {self.unit}, {_duration(elapsed)} elapsed"
        eta = self.eta()
        left = f", about {_duration(eta)} left" if eta is not None and self.done < self.total else ""
        return (f"{self.name}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{_duration(elapsed)} elapsed{left}")


class Progress:
    """Progress of a run: ``with progress.stage("segmenting", total, "tiles") as stage: stage.advance()``."""

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal

    @contextmanager
    def stage(self, name: str, total: int | None, unit: str, done: int = 0) -> Iterator[Stage]:
        """A stage from start to end; off a terminal its start and end are logged."""
        if not self.terminal:
            stage = Stage(name, total, unit, done=done)
            if done:
                log.info("%s: %d/%d %s already done (resumed)", name, done, total or 0, unit)
            try:
                yield stage
            finally:
                if total is None or stage.done >= total:
                    log.info("%s: done, %s", name, _duration(time.monotonic() - stage._start))
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as Bar,
        )

        columns = ([TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()] if total else
                   [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()])
        bar = Bar(*columns, transient=True)
        bar.start()
        task = bar.add_task(name, total=total, completed=done)
        try:
            yield Stage(name, total, unit, bar, task, done)
        finally:
            bar.stop()


def progress_bar(total: int, description: str, enabled: bool) -> Any:
    """A rich progress bar on a terminal, nothing otherwise (training's steps)."""
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), transient=True)
    progress.start()
    progress.add_task(description, total=total)
    return progress
