"""Re-score tasks: plan, one task per shard, finalize. Inputs are URLs, names and non-secret storage
options (and the flow's Backends when the shard tasks run as threads of the flow's process and share its
models and servers; none on Ray, where each worker process has its own); outputs small dicts.

Resumability lives in storage (shard records), not in Prefect's cache, hence cache_policy=NONE. Shards
and the finalize retry transient faults only (retries.py).
"""

from __future__ import annotations

import atexit
import os
import socket

from prefect import task
from prefect.cache_policies import NONE
from rlme_tasks.retries import RETRY

from rlme_pipeline import scoreset
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import VllmConfig
from rlme_pipeline.storage.run import Run

# The Backends of this Ray worker process, by vLLM settings: a worker scores shard after shard, and loads
# each model once, not once per shard. Scope: only shard_task reads it, and only when it is given no
# Backends (on Ray). Ray binds a worker process to one job (the flow run's connection to the cluster)
# and ends it with the job, so what it holds lives no longer than the re-score that loaded it.
_worker_backends: dict[str, Backends] = {}


def worker_backends(vllm: VllmConfig) -> Backends:
    """This process's Backends for these settings; one set at a time (other settings close the old one)."""
    key = vllm.model_dump_json()
    if key not in _worker_backends:
        close_worker_backends()
        _worker_backends[key] = Backends(vllm)
    return _worker_backends[key]


def close_worker_backends() -> None:
    while _worker_backends:
        _worker_backends.popitem()[1].close()


atexit.register(close_worker_backends)  # a kept-alive vLLM server stops when its worker process exits


@task(name="rescore-plan", cache_policy=NONE)
def plan_task(
    run_uri: str,
    name: str,
    questions_file: str | None,
    evaluators_file: str | None,
    iterations: str | None,
    shard_rows: int,
    resume: bool,
    storage_options: dict | None = None,
) -> list[tuple[int, int]]:
    run = Run.from_url(run_uri, storage_options)
    run.meta()  # a missing or copied run says so in one line
    defn = scoreset.plan(
        run,
        name,
        questions=scoreset.load_questions(questions_file, storage_options) if questions_file else None,
        evaluators=scoreset.load_evaluators(evaluators_file, storage_options) if evaluators_file else None,
        iterations=iterations,
        shard_rows=shard_rows,
        resume=resume,
    )
    return scoreset.shards(defn)


@task(
    name="rescore-shard",
    cache_policy=NONE,
    **RETRY,
    task_run_name="rescore-{name}-iter-{iteration}-shard-{shard}",
)
def shard_task(
    run_uri: str,
    name: str,
    iteration: int,
    shard: int,
    backends: Backends | None,
    storage_options: dict | None = None,
) -> dict:
    """`backends` None: a Ray worker, which scores with its own (worker_backends)."""
    run = Run.from_url(run_uri, storage_options)
    backends = backends or worker_backends(run.config().vllm_settings())
    rec = scoreset.score_shard(run, name, iteration, shard, backends)
    out = {k: rec.get(k) for k in ("iteration", "shard", "rollouts", "seconds", "ran")}
    return {**out, "worker": f"{socket.gethostname()}:{os.getpid()}"}


@task(name="rescore-finalize", cache_policy=NONE, **RETRY)
def finalize_task(run_uri: str, name: str, storage_options: dict | None = None) -> dict:
    return scoreset.finalize(Run.from_url(run_uri, storage_options), name)
