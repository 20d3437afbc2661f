"""Re-score tasks: plan, one task per shard, finalize. Inputs are URLs, names and non-secret storage
options (and the flow's Backends: the shard tasks run in the flow's process and share its models and
servers); outputs small dicts.

Resumability lives in storage (shard records), not in Prefect's cache, hence cache_policy=NONE. Shards
and the finalize retry transient faults only (retries.py).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from rlme_pipeline import scoreset
from rlme_pipeline.backends.select import Backends
from rlme_pipeline.run import Run
from rlme_tasks.retries import RETRY


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
    run_uri: str, name: str, iteration: int, shard: int, backends: Backends, storage_options: dict | None = None
) -> dict:
    rec = scoreset.score_shard(Run.from_url(run_uri, storage_options), name, iteration, shard, backends)
    return {k: rec.get(k) for k in ("iteration", "shard", "rollouts", "seconds", "ran")}


@task(name="rescore-finalize", cache_policy=NONE, **RETRY)
def finalize_task(run_uri: str, name: str, storage_options: dict | None = None) -> dict:
    return scoreset.finalize(Run.from_url(run_uri, storage_options), name)
