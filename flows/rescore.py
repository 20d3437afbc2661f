"""rlme_rescore: judge a run's stored rollouts again, into {run}/scoresets/{name}/; training data untouched."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from rlme_flows.config_io import public_options
from rlme_flows.train import artifact_key
from rlme_tasks.fan_out import on_ray, submitted
from rlme_tasks.ray import RayShards, check_address, unreachable
from rlme_tasks.steps import as_tasks

from rlme_pipeline import scoreset
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.storage.run import Run


@flow(name="rlme_rescore", log_prints=True)
def rlme_rescore(
    run_uri: str,
    name: str,
    questions: str | None = None,
    evaluators: str | None = None,
    iterations: str | None = None,
    resume: bool = False,
    shard_rows: int = 256,
    storage_options: dict | None = None,
    ray: str | None = None,
    ray_num_cpus: float = 1.0,
    ray_num_gpus: float = 0.0,
    ray_shards_per_task: int = 4,
) -> dict:
    """The re-score job (rlme_pipeline/jobs/rescore.py) with its plan and finalize as tasks and its shards
    submitted together: as threads of this process sharing one set of models (the run's vLLM settings),
    or, with `ray` (a cluster address, tasks/ray.py), as Ray tasks of `ray_shards_per_task` shards each,
    asking for ray_num_cpus/ray_num_gpus and loading the judges once per task. Each shard commits on its
    own, so a re-run with resume=True only scores the shards that did not finish. storage_options
    (non-secret fsspec options) apply to the run and to the questions/evaluators files."""
    log = get_run_logger()
    opts = public_options(storage_options)
    run = Run.from_url(run_uri, opts)
    run.meta()  # a missing or copied run says so in one line
    args = {
        "questions": scoreset.load_questions(questions, opts) if questions else None,
        "evaluators": scoreset.load_evaluators(evaluators, opts) if evaluators else None,
        "iterations": iterations,
        "shard_rows": shard_rows,
        "resume": resume,
        "wrap": as_tasks(),
    }
    if ray:
        on = RayShards(address=ray, num_cpus=ray_num_cpus, num_gpus=ray_num_gpus)
        check_address(on.address)  # before the plan writes anything
        log.info("score set %s of %s: shards on Ray at %s", name, run_uri, ray)
        try:
            m = rescore(run, name, **args, shards_per_task=ray_shards_per_task, fan_out=on_ray(on, "rescore-shards"))
        except ConnectionError as e:  # the runner could not join the cluster: no shard has started
            raise unreachable(ray, e) from None
    else:
        with Backends(run.config().vllm_settings()) as backends:  # stopped when every shard is done
            m = rescore(run, name, **args, backends=backends, shards_per_task=1, fan_out=submitted("rescore-shard"))
    create_table_artifact(
        key=f"{artifact_key(m['run_id'])}-scoreset-{artifact_key(name).removeprefix('rlme-')}",
        table=[{"iteration": int(i), **v} for i, v in m["metrics"].items()],
        description=f"score set {name} of {run_uri}: reward per iteration under the new questions/evaluators",
    )
    return {
        "run": run_uri,
        "scoreset": name,
        "shards_scored_now": sum(1 for d in m["shards"] if d["ran"]),
        "shards": len(m["shards"]),
        "workers": sorted({d["worker"] for d in m["shards"] if d["ran"]}),
        "files": [f"{run_uri.rstrip('/')}/{f['path']}" for f in m["files"]],
    }
