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
from rlme_flows.config_io import load
from rlme_flows.events import PROBE_ALARM, alarms, emit
from rlme_tasks.steps import as_tasks

from rlme_pipeline.evolve import adopt as adoption
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.jobs.train import train
from rlme_pipeline.storage.lease import LeaseHeld
from rlme_pipeline.storage.run import Manifest, Run, split_run_url


def metrics_rows(manifest: Manifest) -> list[dict]:
    rows = [{"metric": k, "value": v} for k, v in sorted(manifest.metrics.items())]
    rows += [{"metric": f"seconds/{k}", "value": v} for k, v in manifest.timings.items()]
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


@flow(name="rlme_train", log_prints=True)
def rlme_train(
    config: str,
    iterations: int | None = None,
    storage: str | None = None,
    run_id: str | None = None,
    run_uri: str | None = None,
    advance: int | None = None,
    adopt: str | None = None,
):
    """`iterations` is the total the run should reach; `advance` instead trains that many iterations past
    the last committed one (what a schedule wants: each scheduled run moves the same run forward by N).
    Committed iterations are never redone. `run_uri` ({storage}/{run_id}) replaces storage and run_id.
    `adopt` ({run}/proposals/NAME or a questions file) trains with those questions from the next iteration
    on, as a recorded phase; given again once adopted, it changes nothing (docs/evolve.md).

    When another process holds the run's lease (an overlapping scheduled run, a CLI run), the flow touches
    nothing and ends Cancelled with a message naming the holder, so an overlap is never a failure."""
    log = get_run_logger()
    if advance is not None and (iterations is not None or advance < 1):
        raise ValueError(
            "give either iterations (the total to reach) or advance (>= 1 iterations past the last committed one)"
        )
    if run_uri is not None:
        if storage is not None or run_id is not None:
            raise ValueError("give either run_uri or storage/run_id, not both")
        storage, run_id = split_run_url(run_uri)
    cfg = load(config, iterations=iterations, storage=storage, id=run_id)
    run = Run.for_config(cfg)
    adopted = adoption.load(adopt, cfg.run.storage_options) if adopt else None
    for note in preflight(adoption.judged_with(cfg, adopted), run.root):  # the GPU memory estimate
        log.info(note)
    # The flow process holds the run's lease for all its tasks (they run in this process); a second flow
    # run on the same run id stops before touching anything, naming this one.
    with background_reports(log) as send:
        try:
            made = train(
                cfg,
                run,
                wrap=as_tasks(cfg.run.stage_timeout_s),
                advance=advance,
                holder={"flow_run": flow_run.id},
                on_commit=lambda m: _report(cfg, run, m, send, log),
                logger=log,
                adopt=adopted,
            )
        except LeaseHeld as e:
            log.warning("not training: %s", e)
            return Cancelled(message=f"skipped, run is busy: {e}")
    return {
        "run": run.url,
        "storage_options": cfg.run.storage_options,
        "committed": run.committed(),
        "trained_now": [m.iteration for m in made],
    }


def _report(cfg, run: Run, manifest: Manifest, send, log) -> None:
    """An iteration is committed: its metrics as an artifact; each alarm it raises as a warning and a Prefect
    event (events.py), the probe's also as an artifact."""
    i = manifest.iteration
    send(
        create_table_artifact,
        key=artifact_key(cfg.run.id),
        table=metrics_rows(manifest),
        description=f"{run.url} iteration {i} (reward, judgements, loss, seconds per stage)",
    )
    for alarm in alarms(cfg, manifest):
        log.warning("iteration %d: %s", i, alarm.describe())
        emit(alarm, cfg, run.url, i)
        if alarm.event == PROBE_ALARM:
            # The judges call the probe's vacuous answers good: the policy can be rewarded for them.
            send(
                create_markdown_artifact,
                key=f"{artifact_key(cfg.run.id)}-probe-alarm",
                markdown=f"**Judge-hacking probe alarm** at iteration {i} of `{run.url}`: "
                f"max share of master-key / vacuous answers judged positive {alarm.metrics['probe/share_max']:.2f} "
                f"> alarm_share {alarm.threshold}. Run `rlme audit` and consider stopping.",
            )
