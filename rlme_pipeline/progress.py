"""Rich progress bars for the stages (quiet when not attached to a terminal)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def bar(description: str, total: int):
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    try:
        progress.start()
    except LiveError:
        # Another bar is live (stages scored in parallel threads, e.g. re-score shards): rich allows one
        # live display per console, so this one counts silently.
        yield lambda n=1: None
        return
    try:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
    finally:
        progress.stop()
