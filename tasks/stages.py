"""The stage tasks of a training iteration.

Inputs are the validated Config and the run's URL; outputs are small JSON-able records. Idempotency is
the library's (stage records in storage), not Prefect's input-hash cache, hence cache_policy=NONE.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from rlme_pipeline.config import Config
from rlme_pipeline.iteration import commit, run_stage
from rlme_pipeline.run import Run


def open_run(cfg: Config) -> Run:
    return Run.for_config(cfg)


def _stage_task(stage: str):
    @task(name=stage, cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10], task_run_name=f"{stage}-iter-{{iteration}}")
    def run(cfg: Config, iteration: int) -> dict:
        rec, ran = run_stage(cfg, open_run(cfg), iteration, stage)
        return {"stage": stage, "iteration": iteration, "ran": ran, "seconds": rec.seconds, "metrics": rec.metrics}

    return run


generate_task = _stage_task("generate")
score_task = _stage_task("score")
aggregate_task = _stage_task("aggregate")
update_task = _stage_task("update")


@task(name="commit", cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10], task_run_name="commit-iter-{iteration}")
def commit_task(cfg: Config, iteration: int) -> dict:
    return commit(cfg, open_run(cfg), iteration).model_dump(mode="json")
