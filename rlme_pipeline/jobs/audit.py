"""The audit job: what each evaluator said, which question drove the reward, where score sets disagree,
whether the judges can be hacked. Every table (audit/report.py) written as Parquet under `out`, the page
that shows them (audit/page.py) as report.html; the run is only read.

`rlme audit` (flows/audit.py, its one step a Prefect task) and the tests call `audit`.
"""

from __future__ import annotations

from functools import partial

import polars as pl

from rlme_pipeline.audit.page import render
from rlme_pipeline.audit.report import compute
from rlme_pipeline.jobs.hooks import Wrap, no_wrap
from rlme_pipeline.storage.parquet import write_frame
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store

TABLES = ("summary", "probe", "labels", "compare")  # the small ones a flow shows as artifacts


def audit(
    run: Run,
    out: Store,
    scoreset: str | None = None,
    compare_to: str | None = None,
    probe_prompts: int = 4,
    wrap: Wrap = no_wrap,
) -> dict:
    """Write {out}/summary.parquet (and the other tables) and {out}/report.html; return a small digest."""
    return wrap("audit", partial(_audit, run, out, scoreset, compare_to, probe_prompts))()


def _audit(run: Run, out: Store, scoreset: str | None, compare_to: str | None, probe_prompts: int) -> dict:
    tables = compute(run, scoreset, compare_to, probe_prompts)
    name = scoreset or "train"
    files = {k: write_frame(out, f"{k}.parquet", v).path for k, v in tables.items()}
    out.write_bytes("report.html", render(run.url, name, tables).encode("utf-8"))
    digest = {"run": run.url, "scoreset": name, "out": out.url, "files": [*files.values(), "report.html"]}
    if "probe" in tables:
        p = tables["probe"]
        digest["probe_share"] = {
            r["evaluator"]: r["share"]
            for r in p.group_by("evaluator")
            .agg(share=pl.col("positive").sum() / pl.col("n").sum())
            .sort("evaluator")
            .iter_rows(named=True)
        }
    return digest


def read_tables(out: Store) -> dict[str, list[dict]]:
    """The small tables back from `out`, as rows (what a flow shows as artifacts)."""
    return {
        name: out.read_parquet(f"{name}.parquet").with_columns(pl.selectors.float().round(4)).to_dicts()
        for name in TABLES
        if out.exists(f"{name}.parquet")
    }
