"""rlme_train: advance a run to N committed iterations; re-running continues where the last one stopped."""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.config_io import load
from rlme_pipeline.iteration import check_resume_point
from rlme_pipeline.lease import Lease, LeaseHeld
from rlme_pipeline.preflight import preflight
from rlme_pipeline.run import Run
from tasks.stages import aggregate_task, commit_task, generate_task, score_task, update_task


def metrics_rows(manifest: dict) -> list[dict]:
    rows = [{"metric": k, "value": v} for k, v in sorted(manifest["metrics"].items())]
    rows += [{"metric": f"seconds/{k}", "value": v} for k, v in manifest["timings"].items()]
    return rows


def artifact_key(run_id: str) -> str:
    return "rlme-" + re.sub(r"[^a-z0-9-]", "-", run_id.lower())


@contextmanager
def background_reports(log) -> Iterator[Callable[..., None]]:
    """`send(create_..._artifact, **kwargs)` creates a Prefect artifact on one background thread.

    An artifact is a round trip to the API (15-80 ms on the temporary server while it also stores the
    tasks' events); the next iteration need not wait for it. The flow waits for all of them before it
    ends. A report that fails is a warning, not a failed flow: its iteration is committed already."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlme-reports")
    sent = []

    def send(create: Callable[..., object], **kwargs) -> None:
        # the copied context carries the flow run, so the artifact is linked to it
        sent.append(pool.submit(contextvars.copy_context().run, create, **kwargs))

    try:
        yield send
    finally:
        pool.shutdown(wait=True)
        for f in sent:
            if f.exception() is not None:
                log.warning("a Prefect artifact was not created: %r", f.exception())


def split_run_uri(run_uri: str) -> tuple[str, str]:
    """`s3://bucket/runs/exp-42` -> (`s3://bucket/runs`, `exp-42`): a deployment names the run by one URI."""
    root, sep, run_id = run_uri.rstrip("/").rpartition("/")
    if not sep or not root or not run_id:
        raise ValueError(f"run_uri {run_uri!r}: expected {{storage}}/{{run_id}}, e.g. s3://bucket/runs/exp-42")
    return root, run_id


def stage_tasks(cfg) -> dict:
    """The stage tasks by name, each with its `run.stage_timeout_s` limit. A stage that times out fails
    that try and is retried (the task's retries); if all tries fail the flow run fails, and the finished
    stages' records let the next (scheduled) run resume the iteration from the stage that failed."""
    timeouts = cfg.run.stage_timeout_s
    return {t.name: t.with_options(timeout_seconds=timeouts[t.name]) if t.name in timeouts else t
            for t in (generate_task, score_task, aggregate_task, update_task, commit_task)}


@flow(name="rlme_train", log_prints=True)
def rlme_train(config: str, iterations: int | None = None, storage: str | None = None, run_id: str | None = None,
               run_uri: str | None = None, advance: int | None = None):
    """`iterations` is the total the run should reach; `advance` instead trains that many iterations past
    the last committed one (what a schedule wants: each scheduled run moves the same run forward by N).
    Committed iterations are never redone. `run_uri` ({storage}/{run_id}) replaces storage and run_id.

    When another process holds the run's lease (an overlapping scheduled run, a CLI run), the flow touches
    nothing and ends Cancelled with a message naming the holder, so an overlap is never a failure."""
    log = get_run_logger()
    if advance is not None and (iterations is not None or advance < 1):
        raise ValueError("give either iterations (the total to reach) or advance (>= 1 iterations past the last committed one)")
    if run_uri is not None:
        if storage is not None or run_id is not None:
            raise ValueError("give either run_uri or storage/run_id, not both")
        storage, run_id = split_run_uri(run_uri)
    cfg = load(config, iterations=iterations, storage=storage, id=run_id)
    run = Run.for_config(cfg)
    preflight(cfg, run.root)
    # The flow process holds the run's lease for all its tasks (they run in this process) and renews it
    # in the background; a second flow run on the same run id stops here, naming this one.
    try:
        lease = Lease(run.store, purpose="train", flow_run=flow_run.id).__enter__()
    except LeaseHeld as e:
        log.warning("not training: %s", e)
        return Cancelled(message=f"skipped, run is busy: {e}")
    try:
        return _train(cfg, run, lease, advance, log)
    finally:
        lease.__exit__(None, None, None)


def _train(cfg, run: Run, lease: Lease, advance: int | None, log) -> dict:
    run.open(cfg)
    committed = set(check_resume_point(run))
    if advance is not None:
        cfg = cfg.with_overrides(iterations=(max(committed) + 1 if committed else 0) + advance)
    log.info("run %s: %d committed iterations, target %d", run.url, len(committed), cfg.run.iterations)
    stages = stage_tasks(cfg)
    made = []
    with background_reports(log) as send:
        for i in range(cfg.run.iterations):
            if i not in committed:
                _iteration(cfg, run, stages, lease, i, send, log)
                made.append(i)
    return {"run": run.url, "storage_options": cfg.run.storage_options, "committed": run.committed(), "trained_now": made}


def _iteration(cfg, run: Run, stages: dict, lease: Lease, i: int, send, log) -> None:
    # Each task waits on the previous one's result: the stages of an iteration are strictly ordered.
    for stage in ("generate", "score", "aggregate", "update"):
        lease.check()
        stages[stage](cfg, i)
    lease.check()
    manifest = stages["commit"](cfg, i)
    send(create_table_artifact, key=artifact_key(cfg.run.id), table=metrics_rows(manifest),
         description=f"{run.url} iteration {i} (reward, judgements, loss, seconds per stage)")
    if manifest["metrics"].get("probe/alarm"):
        # The judges call the probe's vacuous answers good: the policy can be rewarded for them.
        shares = {k: v for k, v in manifest["metrics"].items() if k.startswith("probe/")}
        log.warning("iteration %d: judge-hacking probe alarm %s", i, shares)
        send(create_markdown_artifact, key=f"{artifact_key(cfg.run.id)}-probe-alarm",
             markdown=f"**Judge-hacking probe alarm** at iteration {i} of `{run.url}`: "
             f"max share of master-key / vacuous answers judged positive {shares['probe/share_max']:.2f} "
             f"> alarm_share {cfg.probe.alarm_share}. Run `rlme audit` and consider stopping.")
