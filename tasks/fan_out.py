"""The `fan_out` hook of the flows (rlme_pipeline/jobs/hooks.py): independent pieces of a job (a re-score's
shards) as Prefect tasks, submitted together and awaited in order.

    submitted(name)            on the flow's task runner: threads of the flow's process, which may share
                               the flow's models (the piece's fn carries them)
    on_ray(ray, name)          on a Ray cluster: a subflow with prefect-ray's task runner (ray.py); each
                               task asks Ray for its CPUs/GPUs, and its fn must open its own models

A piece is retried on transient faults only (retries.py); its parameters are its item (URIs, names, a
few shard numbers), never a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prefect import flow, task
from prefect.cache_policies import NONE
from rlme_tasks.ray import RayShards
from rlme_tasks.retries import RETRY

from rlme_pipeline.jobs.hooks import FanOut


def _submit_all(fn: Callable, items: Sequence[tuple], name: str) -> list:
    def piece(*item):
        return fn(*item)

    t = task(piece, name=name, cache_policy=NONE, **RETRY)
    futures = [t.with_options(task_run_name=f"{name}-{k}").submit(*item) for k, item in enumerate(items)]
    return [f.result() for f in futures]


def submitted(name: str) -> FanOut:
    return lambda fn, items: _submit_all(fn, items, name)


def on_ray(ray: RayShards, name: str) -> FanOut:
    """Each item a Ray task, in a subflow (`{name}s`) run on prefect-ray's task runner; the subflow's
    parameters are the items, so the UI shows what each task was given."""

    def fan_out(fn: Callable, items: Sequence[tuple]) -> list:
        from prefect_ray.context import remote_options

        @flow(name=f"rlme_{name.replace('-', '_')}s", task_runner=ray.task_runner(), log_prints=True)
        def pieces(items: list) -> list:
            with remote_options(**ray.remote_options()):
                return _submit_all(fn, [tuple(i) for i in items], name)

        return pieces([list(i) for i in items])

    return fan_out
