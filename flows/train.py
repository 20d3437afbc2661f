"""rlme_train: advance a run to N committed iterations; re-running continues where the last one stopped."""

from __future__ import annotations

import re

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.config_io import load
from rlme_pipeline.preflight import preflight
from rlme_pipeline.run import Run
from rlme_pipeline.storage import Store
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
    run = Run(Store(cfg.run.storage), cfg.run.id)
    preflight(cfg, run.root)
    run.open(cfg)
    committed = set(run.committed())
    log.info("run %s: %d committed iterations, target %d", run.url, len(committed), cfg.run.iterations)
    made = []
    for i in range(cfg.run.iterations):
        if i in committed:
            continue
        # Each task waits on the previous one's result: the stages of an iteration are strictly ordered.
        generate_task(cfg, i)
        score_task(cfg, i)
        aggregate_task(cfg, i)
        update_task(cfg, i)
        manifest = commit_task(cfg, i)
        create_table_artifact(
            key=artifact_key(cfg.run.id), table=metrics_rows(manifest),
            description=f"{run.url} iteration {i} (reward, judgements, loss, seconds per stage)",
        )
        if manifest["metrics"].get("probe/alarm"):
            # The judges call empty answers good: the policy can now be rewarded for saying nothing.
            shares = {k: v for k, v in manifest["metrics"].items() if k.startswith("probe/")}
            log.warning("iteration %d: judge-hacking probe alarm %s", i, shares)
            create_markdown_artifact(
                key=f"{artifact_key(cfg.run.id)}-probe-alarm",
                markdown=f"**Judge-hacking probe alarm** at iteration {i} of `{run.url}`: "
                f"max share of empty answers judged positive {shares['probe/share_max']:.2f} "
                f"> alarm_share {cfg.probe.alarm_share}. Run `rlme audit` and consider stopping.",
            )
        made.append(i)
    return {"run": run.url, "committed": run.committed(), "trained_now": made}
