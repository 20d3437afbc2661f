"""The two hooks every job takes, so that one loop serves a plain process, a Prefect flow and a Ray cluster.

    wrap(name, step) -> step     how one step of the loop runs: itself (no_wrap), or as a Prefect task
                                 with retries and a timeout (tasks/steps.py)
    fan_out(fn, items) -> list   how independent pieces run: fn(*item) for each item, in order
                                 (in_order), as Prefect tasks on the flow's task runner, or on Ray
                                 (tasks/fan_out.py); results in the order of `items`

A job never imports Prefect: the flows pass Prefect's versions of the hooks. An item holds only URIs,
names and small records; whatever fn needs beyond its item (a process's models) it carries itself, so a
fan-out to other processes gets a fn that opens its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Step = Callable[..., Any]
Wrap = Callable[[str, Step], Step]
FanOut = Callable[[Callable[..., Any], Sequence[tuple]], list]


def no_wrap(name: str, step: Step) -> Step:
    return step


def in_order(fn: Callable[..., Any], items: Sequence[tuple]) -> list:
    return [fn(*item) for item in items]
