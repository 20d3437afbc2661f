"""The Prefect task that runs one step (a stage, or the commit) of a training iteration.

The runner (rlme_pipeline.jobs.train) owns the loop; the flow's wrap hook calls each step through this task,
so the UI shows one task run per stage and iteration (`generate-iter-3`), with the stage's timeout and
retries of transient faults only (retries.py). The step is a callable of the flow's own process: the
flow's tasks run there, beside the models and servers the runner holds, and what a step returns is its
record (small and JSON-able), never a model or a table. Idempotency is the library's (stage records in
storage), not Prefect's input-hash cache, hence cache_policy=NONE.
"""

from __future__ import annotations

from prefect import Task, task
from prefect.cache_policies import NONE
from rlme_tasks.retries import RETRY

from rlme_pipeline.jobs.train import Step, Wrap


@task(cache_policy=NONE, **RETRY)
def _run_step(step: Step, iteration: int):
    return step(iteration)


def stage_task(name: str, timeout_s: float | None = None) -> Task:
    """The task for step `name`. A step that times out or meets a transient fault fails that try and is
    retried; any other error fails at once. When the task fails the flow run fails, and the finished
    stages' records let the next run resume the iteration from the stage that failed."""
    return _run_step.with_options(name=name, task_run_name=f"{name}-iter-{{iteration}}", timeout_seconds=timeout_s)


def wrap_in(tasks: dict[str, Task]) -> Wrap:
    """The runner's wrap hook: each step runs as its task (waiting for the result: steps are ordered)."""
    return lambda name, step: lambda iteration: tasks[name](step, iteration)
