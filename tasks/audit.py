"""The audit task: reads the run lazily, writes Parquet tables and report.html, returns a small digest."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from rlme_pipeline.audit.report import audit
from rlme_pipeline.run import Run
from rlme_pipeline.storage import Store


@task(name="audit", cache_policy=NONE, task_run_name="audit-{scoreset}")
def audit_task(run_uri: str, out: str, scoreset: str | None, compare: str | None, probe_prompts: int) -> dict:
    return audit(Run.from_url(run_uri), Store(out), scoreset, compare, probe_prompts)


@task(name="audit-tables", cache_policy=NONE)
def read_tables(out: str) -> dict[str, list[dict]]:
    """Rows for the Prefect artifacts, read back from the written Parquet (small by construction)."""
    import polars as pl

    store = Store(out)
    tables = {}
    for name in ("summary", "probe", "labels", "compare"):
        if store.exists(f"{name}.parquet"):
            tables[name] = store.read_parquet(f"{name}.parquet").with_columns(pl.selectors.float().round(4)).to_dicts()
    return tables
