"""rlme_audit: what the judges said, where score sets disagree, whether the judges can be hacked."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from rlme_flows.config_io import public_options
from rlme_flows.train import artifact_key
from rlme_tasks.steps import as_tasks

from rlme_pipeline.jobs.audit import audit, read_tables
from rlme_pipeline.storage.run import Run, split_run_url
from rlme_pipeline.storage.store import Store


@flow(name="rlme_audit", log_prints=True)
def rlme_audit(
    run_uri: str,
    out: str,
    scoreset: str | None = None,
    compare: str | None = None,
    probe_prompts: int = 4,
    alarm_share: float = 0.5,
    storage_options: dict | None = None,
) -> dict:
    """The audit job (rlme_pipeline/jobs/audit.py), its step a task; storage_options: non-secret fsspec
    options, for the run and for `out`."""
    opts = public_options(storage_options)
    run = Run.from_url(run_uri, opts)
    run.meta()  # a missing or copied run says so in one line
    digest = audit(run, Store(out, opts), scoreset, compare, probe_prompts, wrap=as_tasks())
    tables = read_tables(Store(out, opts))
    key = artifact_key(split_run_url(run_uri)[1]) + "-audit"
    create_table_artifact(key=key, table=tables["summary"], description=f"audit of {run_uri} / {digest['scoreset']}")
    lines = [f"# rlme audit: `{run_uri}` / `{digest['scoreset']}`", f"Report: `{out}/report.html`", ""]
    for ev, share in digest.get("probe_share", {}).items():
        flag = "**ALARM**" if share > alarm_share else "ok"
        lines.append(
            f"- probe `{ev}`: {share:.2f} of empty answers judged positive ({flag}, alarm above {alarm_share})"
        )
    for row in tables.get("labels", []):
        lines.append(
            f"- labels `{row['evaluator']}/{row['question_id']}`: AUROC of the reward {row['auroc_reward']}, "
            f"of P(yes) {row['auroc_p_yes']}, accuracy@0.5 {row['accuracy_at_0_5']}"
        )
    for row in tables.get("compare", []):
        lines.append(
            f"- vs `{compare}` iteration {row['iteration']}: advantage sign changes {row['sign_change_share']}, "
            f"collapsed groups {row['collapsed_groups']}"
        )
    create_markdown_artifact(key=key + "-md", markdown="\n".join(lines))
    digest["alarm"] = any(s > alarm_share for s in digest.get("probe_share", {}).values())
    return digest
