"""The task a job's step runs as: the `wrap` hook of every flow (rlme_pipeline/jobs/hooks.py).

Each step of a job's loop (a training stage, the commit, a re-score's plan, an evolve measure) becomes a
Prefect task named after it (`generate-iter-3`, `rescore-plan`), retried on transient faults only
(retries.py), with its `run.stage_timeout_s` limit where one is set. The step is a callable of the flow's
own process, beside the models the job holds; its parameters are at most the iteration, and what it
returns is its small record. Idempotency is the library's (records in storage), not Prefect's
input-hash cache, hence cache_policy=NONE. When a task fails the flow run fails, and the finished steps'
records let the next run resume from the step that failed.
"""

from __future__ import annotations

import inspect

from prefect import task
from prefect.cache_policies import NONE
from rlme_tasks.retries import RETRY

from rlme_pipeline.jobs.hooks import Step, Wrap


def as_tasks(timeouts: dict[str, float] | None = None) -> Wrap:
    """The wrap hook: each step a task (waiting for its result: a job's steps are ordered)."""

    def wrap(name: str, step: Step) -> Step:
        per_iteration = "iteration" in inspect.signature(step).parameters
        return task(
            step,
            name=name,
            task_run_name=f"{name}-iter-{{iteration}}" if per_iteration else name,
            timeout_seconds=(timeouts or {}).get(name),
            cache_policy=NONE,
            **RETRY,
        )

    return wrap
