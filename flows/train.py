"""rlme_train: advance a run to N committed iterations; re-running continues where the last one stopped."""

from __future__ import annotations

import re

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.config_io import load
from rlme_pipeline.iteration import check_resume_point
from rlme_pipeline.lease import Lease
from rlme_pipeline.preflight import preflight
from rlme_pipeline.run import Run
from tasks.stages import aggregate_task, commit_task, generate_task, score_task, update_task


def metrics_rows(manifest: dict) -> list[dict]:
    rows = [{"metric": k, "value": v} for k, v in sorted(manifest["metrics"].items())]
    rows += [{"metric": f"seconds/{k}", "value": v} for k, v in manifest["timings"].items()]
    return rows


def artifact_key(run_id: str) -> str:
    return "rlme-" + re.sub(r"[^a-z0-9-]", "-", run_id.lower())


@flow(name="rlme_train", log_prints=True)
def rlme_train(config: str, iterations: int | None = None, storage: str | None = None, run_id: str | None = None) -> dict:
    """`iterations` is the total the run should reach, so a schedule can pass a growing target or the
    run's own config value; committed iterations are never redone."""
    log = get_run_logger()
    cfg = load(config, iterations=iterations, storage=storage, id=run_id)
    run = Run.for_config(cfg)
    preflight(cfg, run.root)
    # The flow process holds the run's lease for all its tasks (they run in this process) and renews it
    # in the background; a second flow run on the same run id fails here, naming this one.
    with Lease(run.store, purpose="train", flow_run=flow_run.id) as lease:
        run.open(cfg)
        committed = set(check_resume_point(run))
        log.info("run %s: %d committed iterations, target %d", run.url, len(committed), cfg.run.iterations)
        made = []
        for i in range(cfg.run.iterations):
            if i in committed:
                continue
            # Each task waits on the previous one's result: the stages of an iteration are strictly ordered.
            for stage_task in (generate_task, score_task, aggregate_task, update_task):
                lease.check()
                stage_task(cfg, i)
            lease.check()
            manifest = commit_task(cfg, i)
            create_table_artifact(
                key=artifact_key(cfg.run.id), table=metrics_rows(manifest),
                description=f"{run.url} iteration {i} (reward, judgements, loss, seconds per stage)",
            )
            if manifest["metrics"].get("probe/alarm"):
                # The judges call the probe's vacuous answers good: the policy can be rewarded for them.
                shares = {k: v for k, v in manifest["metrics"].items() if k.startswith("probe/")}
                log.warning("iteration %d: judge-hacking probe alarm %s", i, shares)
                create_markdown_artifact(
                    key=f"{artifact_key(cfg.run.id)}-probe-alarm",
                    markdown=f"**Judge-hacking probe alarm** at iteration {i} of `{run.url}`: "
                    f"max share of master-key / vacuous answers judged positive {shares['probe/share_max']:.2f} "
                    f"> alarm_share {cfg.probe.alarm_share}. Run `rlme audit` and consider stopping.",
                )
            made.append(i)
        return {"run": run.url, "storage_options": cfg.run.storage_options, "committed": run.committed(), "trained_now": made}
