"""rlme_rescore: judge a run's stored rollouts again, into {run}/scoresets/{name}/; training data untouched."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from rlme_flows.config_io import public_options
from rlme_flows.ray_shards import RayShards, check_address, unreachable
from rlme_flows.train import artifact_key
from rlme_tasks.rescore import finalize_task, plan_task, shard_task

from rlme_pipeline.backends.session import Backends
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
) -> dict:
    """Shards are submitted together and run in parallel on the flow's task runner; each commits on
    its own, so a re-run with resume=True only scores the shards that did not finish. storage_options
    (non-secret fsspec options) apply to the run and to the questions/evaluators files. With `ray` (a
    cluster address, flows/ray_shards.py) each shard is a Ray task asking for ray_num_cpus/ray_num_gpus."""
    log = get_run_logger()
    opts = public_options(storage_options)
    on_ray = RayShards(address=ray, num_cpus=ray_num_cpus, num_gpus=ray_num_gpus) if ray else None
    if on_ray:
        check_address(on_ray.address)  # before the plan writes anything
    todo = plan_task(run_uri, name, questions, evaluators, iterations, shard_rows, resume, opts)
    log.info("score set %s of %s: %d shards%s", name, run_uri, len(todo), f" on Ray at {ray}" if ray else "")
    if on_ray:
        try:
            shards_flow = rlme_rescore_shards.with_options(task_runner=on_ray.task_runner())
            done = shards_flow(run_uri, name, todo, opts, on_ray.remote_options())
        except ConnectionError as e:  # the runner could not join the cluster: no shard has started
            raise unreachable(ray, e) from None
    else:
        # one set of models and servers for every shard (the run's vLLM settings), stopped when all are done
        with Backends(Run.from_url(run_uri, opts).config().vllm_settings()) as backends:
            futures = [shard_task.submit(run_uri, name, i, s, backends, opts) for i, s in todo]
            done = [f.result() for f in futures]
    manifest = finalize_task(run_uri, name, opts)
    create_table_artifact(
        key=f"{artifact_key(manifest['run_id'])}-scoreset-{artifact_key(name).removeprefix('rlme-')}",
        table=[{"iteration": int(i), **m} for i, m in manifest["metrics"].items()],
        description=f"score set {name} of {run_uri}: reward per iteration under the new questions/evaluators",
    )
    return {
        "run": run_uri,
        "scoreset": name,
        "shards_scored_now": sum(1 for d in done if d["ran"]),
        "shards": len(done),
        "workers": sorted({d["worker"] for d in done if d["ran"]}),
        "files": [f"{run_uri.rstrip('/')}/{f['path']}" for f in manifest["files"]],
    }


@flow(name="rlme_rescore_shards", log_prints=True)
def rlme_rescore_shards(
    run_uri: str, name: str, todo: list[tuple[int, int]], storage_options: dict | None, remote_options: dict
) -> list[dict]:
    """The shard fan-out on another task runner (Ray). A shard runs in a worker process and cannot take the
    flow's Backends: each worker scores with its own, built from the run's vLLM settings (tasks/rescore.py)."""
    from prefect_ray.context import remote_options as ray_options

    with ray_options(**remote_options):
        futures = [shard_task.submit(run_uri, name, i, s, None, storage_options) for i, s in todo]
    return [f.result() for f in futures]
