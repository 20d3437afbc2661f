"""The audit task: reads the run lazily, writes Parquet tables and report.html, returns a small digest.
Storage options (non-secret) apply to the run and to the output alike."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from rlme_pipeline.audit.report import audit
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store


@task(name="audit", cache_policy=NONE, task_run_name="audit-{scoreset}")
def audit_task(
    run_uri: str,
    out: str,
    scoreset: str | None,
    compare: str | None,
    probe_prompts: int,
    storage_options: dict | None = None,
) -> dict:
    run = Run.from_url(run_uri, storage_options)
    run.meta()  # a missing or copied run says so in one line
    return audit(run, Store(out, storage_options), scoreset, compare, probe_prompts)


@task(name="audit-tables", cache_policy=NONE)
def read_tables(out: str, storage_options: dict | None = None) -> dict[str, list[dict]]:
    """Rows for the Prefect artifacts, read back from the written Parquet (small by construction)."""
    import polars as pl

    store = Store(out, storage_options)
    tables = {}
    for name in ("summary", "probe", "labels", "compare"):
        if store.exists(f"{name}.parquet"):
            tables[name] = store.read_parquet(f"{name}.parquet").with_columns(pl.selectors.float().round(4)).to_dicts()
    return tables
