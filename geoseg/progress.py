"""Progress for the user: bars on a terminal."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, description: str, enabled: bool) -> Any:
    """A rich progress bar on a terminal, nothing otherwise."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    progress.start()
    progress.add_task(description, total=total)
    return progress
