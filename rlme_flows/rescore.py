"""rlme_rescore: judge a run's stored rollouts again, into {run}/scoresets/{name}/; training data untouched."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from rlme_flows.config_io import public_options
from rlme_flows.train import artifact_key
from rlme_pipeline.backends.select import Backends
from rlme_pipeline.run import Run
from rlme_tasks.rescore import finalize_task, plan_task, shard_task


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
) -> dict:
    """Shards are submitted together and run in parallel on the flow's task runner; each commits on
    its own, so a re-run with resume=True only scores the shards that did not finish. storage_options
    (non-secret fsspec options) apply to the run and to the questions/evaluators files."""
    log = get_run_logger()
    opts = public_options(storage_options)
    todo = plan_task(run_uri, name, questions, evaluators, iterations, shard_rows, resume, opts)
    log.info("score set %s of %s: %d shards", name, run_uri, len(todo))
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
        "files": [f"{run_uri.rstrip('/')}/{f['path']}" for f in manifest["files"]],
    }
