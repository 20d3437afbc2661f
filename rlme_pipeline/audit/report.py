"""The audit: every table computed, written as Parquet, and rendered as one self-contained HTML file."""

from __future__ import annotations

import datetime as dt
from html import escape

import polars as pl

from rlme_pipeline.audit import compare as cmp
from rlme_pipeline.audit import labels, stats
from rlme_pipeline.audit.sources import Scoreset, load
from rlme_pipeline.audit.svg import histogram, line_chart
from rlme_pipeline.backends.select import Backends
from rlme_pipeline.judging import evaluators_at, run_probe, sample_prompts
from rlme_pipeline.parquet_io import write_frame
from rlme_pipeline.run import Run
from rlme_pipeline.storage import Store

BINS = 20


def probe_table(run: Run, ss: Scoreset, prompts: int, seed: int = 0) -> pl.DataFrame:
    """The judge-hacking probe against the evaluators and questions of this score set, as configured at
    the run's last committed iteration (live self = the newest policy)."""
    cfg = run.config()
    last = max(run.committed())
    if ss.name == "train":
        evs, qs = cfg.evaluators, cfg.questions
    else:
        from rlme_pipeline.scoreset import load_definition

        d = load_definition(run, ss.name)
        evs, qs, last = d.evaluators, d.questions, max(d.iterations)
    pool = ss.rollouts.select("prompt_id", "prompt").unique("prompt_id").collect()
    with Backends(cfg.vllm_settings()) as backends:  # the run's vLLM settings, its servers stopped after
        return run_probe(evaluators_at(run, cfg, last, evs), list(qs), cfg.scoring, sample_prompts(pool, prompts, seed),
                         last, backends)


def compute(run: Run, scoreset: str | None = None, compare_to: str | None = None, probe_prompts: int = 4) -> dict[str, pl.DataFrame]:
    ss = load(run, scoreset)
    out = {
        "summary": stats.summary(ss).collect(),
        "failures": stats.failures(ss).collect(),
        "correlations": stats.correlations(ss),
        "agreement": stats.agreement(ss),
        "labels": labels.label_metrics(ss),
        "calibration": labels.calibration(ss),
        "histograms": ss.scores.filter(pl.col("p_yes").is_not_null())
        .with_columns(bin=(pl.col("p_yes") * BINS).floor().clip(0, BINS - 1).cast(pl.Int32))
        .group_by("evaluator", "question_id", "bin").agg(n=pl.len()).sort("evaluator", "question_id", "bin").collect(),
    }
    if probe_prompts:
        out["probe"] = probe_table(run, ss, probe_prompts)
    if compare_to:
        other = load(run, compare_to)
        out["compare"] = cmp.compare(ss, other)
        out["changed"] = cmp.most_changed(ss, other)
    return out


def _table(df: pl.DataFrame, max_rows: int = 200) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        s = str(v)
        return escape(s if len(s) <= 160 else s[:157] + "...")

    head = "".join(f"<th>{escape(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in df.head(max_rows).iter_rows())
    return f'<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def render(run_url: str, scoreset: str, tables: dict[str, pl.DataFrame]) -> str:
    s = tables["summary"]
    plots_curves, plots_hist, plots_cal = [], [], []
    for (ev,), g in s.group_by("evaluator", maintain_order=True):
        series = {q: list(zip(gq["iteration"].to_list(), gq["f_mean"].to_list())) for (q,), gq in g.group_by("question_id", maintain_order=True)}
        plots_curves.append(line_chart("reward-curve", f"{ev}: mean reward component per question", series, "iteration", "mean f(p)"))
    for (ev, q), g in tables["histograms"].group_by("evaluator", "question_id", maintain_order=True):
        counts = [0] * BINS
        for b, n in zip(g["bin"], g["n"]):
            counts[b] = n
        plots_hist.append(histogram("distribution", f"{ev} / {q}: p_yes", counts, 0.0, 1.0, "p_yes"))
    for (ev, q), g in tables["calibration"].group_by("evaluator", "question_id", maintain_order=True):
        plots_cal.append(line_chart("calibration", f"{ev} / {q}: share correct per p_yes bin",
                                    {"observed": list(zip(g["p_yes_mean"].to_list(), g["correct_share"].to_list()))},
                                    "p_yes", "share correct", diagonal=True))
    sections = [
        ("Reward curves", "".join(plots_curves)),
        ("Per evaluator × question × iteration", _table(s.drop("scoreset"))),
        ("Failures by status", _table(tables["failures"]) if tables["failures"].height else "<p>No failed judgements.</p>"),
        ("Score distributions", "".join(plots_hist)),
        ("Correlation between questions", _table(tables["correlations"])),
        ("Agreement between evaluators", _table(tables["agreement"]) if tables["agreement"].height else "<p>One evaluator only.</p>"),
        ("Against labels", (_table(tables["labels"]) + "".join(plots_cal)) if tables["labels"].height else "<p>No labelled rollouts.</p>"),
    ]
    if "probe" in tables:
        sections.append(("Judge-hacking probe (share of empty answers judged positive)", _table(tables["probe"])))
    if "compare" in tables:
        sections.append(("Score set comparison", _table(tables["compare"])))
        sections.append(("Most changed rollouts", _table(tables["changed"], 20)))
    body = "".join(f"<section><h2>{escape(t)}</h2>{c}</section>" for t, c in sections)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}svg.plot{margin:4px;border:1px solid #eee}")
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>rlme audit: {escape(run_url)} / {escape(scoreset)}</title>"
            f"<style>{style}</style></head><body><h1>rlme audit</h1><p>run <code>{escape(run_url)}</code>, score set "
            f"<code>{escape(scoreset)}</code>, {when}</p>{body}</body></html>")


def audit(run: Run, out: Store, scoreset: str | None = None, compare_to: str | None = None, probe_prompts: int = 4) -> dict:
    """Write {out}/summary.parquet (and the other tables) and {out}/report.html; return a small digest."""
    tables = compute(run, scoreset, compare_to, probe_prompts)
    name = scoreset or "train"
    files = {k: write_frame(out, f"{k}.parquet", v).path for k, v in tables.items()}
    out.write_bytes("report.html", render(run.url, name, tables).encode("utf-8"))
    digest = {"run": run.url, "scoreset": name, "out": out.url, "files": [*files.values(), "report.html"]}
    if "probe" in tables:
        p = tables["probe"]
        digest["probe_share"] = {r["evaluator"]: r["share"] for r in
                                 p.group_by("evaluator").agg(share=pl.col("positive").sum() / pl.col("n").sum()).sort("evaluator").iter_rows(named=True)}
    return digest
