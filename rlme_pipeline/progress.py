"""Progress: rich bars for the stages (live on a terminal; piped, each prints its final line once), each
labelled with what it counts ("generate iter 3: samples", "score iter 3: judge other", "probe iter 3: judge
other", "update iter 3: optimizer steps", "eval iter 3: samples", "rescore v2 shard 2 iter 3: judge
other") and ending at its total, and the runner's line per iteration: "iteration 3 (4/10), 1m05s elapsed,
about 2m10s left"."""

from __future__ import annotations

import time
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


def duration(s: float) -> str:
    """Seconds as 4.2s, 3m05s or 1h02m."""
    s = round(s, 1)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class Clock:
    """The iterations one `train` call trains: `line(i)` says where it is, the time since it started and
    the time left, estimated as the mean seconds of the iterations finished so far (`done()` counts one)
    times the number still to train."""

    def __init__(self, todo: int, total: int):
        self.todo, self.total, self.finished, self.t0 = todo, total, 0, time.monotonic()

    def done(self) -> None:
        self.finished += 1

    def line(self, i: int) -> str:
        elapsed = time.monotonic() - self.t0
        left = (
            f", about {duration(elapsed / self.finished * (self.todo - self.finished))} left" if self.finished else ""
        )
        return f"iteration {i} ({i + 1}/{self.total}), {duration(elapsed)} elapsed{left}"
