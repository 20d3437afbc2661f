"""The audit's tables, computed from a run's score sets (the audit job, jobs/audit.py, writes them and the page)."""

from __future__ import annotations

import polars as pl

from rlme_pipeline.audit import compare as cmp
from rlme_pipeline.audit import labels, stats
from rlme_pipeline.audit.sources import Scoreset, load
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.judging.judges import evaluators_at
from rlme_pipeline.judging.probe import run_probe, sample_prompts
from rlme_pipeline.storage import phases
from rlme_pipeline.storage.retention import CheckpointPruned
from rlme_pipeline.storage.run import Run


def probe_table(run: Run, ss: Scoreset, prompts: int, seed: int = 0) -> pl.DataFrame:
    """The judge-hacking probe against the evaluators and questions of this score set, as configured at
    the run's last committed iteration (live self = the newest policy)."""
    cfg = run.config()
    last = max(run.committed())
    if ss.name == "train":  # the questions the last iteration was trained with (its phase)
        evs, qs = cfg.evaluators, phases.read(run, cfg.questions).at(last).questions
    else:
        from rlme_pipeline.scoreset import load_definition

        d = load_definition(run, ss.name)
        evs, qs, last = d.evaluators, d.questions, max(d.iterations)
    pool = ss.rollouts.select("prompt_id", "prompt").unique("prompt_id").collect()
    try:
        judges = evaluators_at(run, cfg, last, evs)
    except CheckpointPruned as e:
        raise CheckpointPruned(f"{e} For the audit, --probe-prompts 0 skips the probe that needs it.") from None
    with Backends(cfg.vllm_settings()) as backends:  # the run's vLLM settings, its servers stopped after
        return run_probe(
            judges,
            list(qs),
            cfg.scoring,
            sample_prompts(pool, prompts, seed),
            last,
            backends,
        )


EVAL_SCHEMA = {
    "iteration": pl.Int64,
    "prompts": pl.Int64,
    "accuracy": pl.Float64,
    "labelled": pl.Int64,
    "reward_mean": pl.Float64,
    "failed_share": pl.Float64,
    "completion_tokens_mean": pl.Float64,
    "samples": pl.Int64,  # eval.samples k, where above 1
    "pass_at_k": pl.Float64,
    "maj_at_k": pl.Float64,
}


def eval_table(run: Run) -> pl.DataFrame:
    """The held-out evaluation each committed iteration recorded (config eval; eval/* metrics of its
    manifest): one row per evaluated iteration, empty when the run has none."""
    rows = []
    for i in run.committed():
        found = {k.removeprefix("eval/"): v for k, v in run.manifest(i).metrics.items() if k.startswith("eval/")}
        if found:
            rows.append({c: found.get(c) for c in EVAL_SCHEMA} | {"iteration": i})
    return pl.DataFrame(rows, schema=EVAL_SCHEMA, orient="row") if rows else pl.DataFrame(schema=EVAL_SCHEMA)


def questions_table(ss: Scoreset) -> pl.DataFrame:
    """The questions and weights; with phases, each phase's set and the first iteration it judged."""
    if ss.phases is None:
        return pl.DataFrame(
            {
                "question_id": list(ss.question_weights),
                "weight": list(ss.question_weights.values()),
                "text": [ss.question_texts[q] for q in ss.question_weights],
            }
        )
    return (
        ss.phases.group_by("phase", "question_id", "weight", "text", maintain_order=True)
        .agg(from_iteration=pl.col("iteration").min())
        .select("phase", "from_iteration", "question_id", "weight", "text")
    )


def compute(
    run: Run, scoreset: str | None = None, compare_to: str | None = None, probe_prompts: int = 4
) -> dict[str, pl.DataFrame]:
    ss = load(run, scoreset)
    out = {
        "summary": stats.summary(ss).collect(),
        "failures": stats.failures(ss).collect(),
        "correlations": stats.correlations(ss),
        "agreement": stats.agreement(ss),
        "labels": labels.label_metrics(ss),
        "calibration": labels.calibration(ss),
        "histograms": stats.histograms(ss).collect(),
        "totals": stats.totals(ss).collect(),
        "scoreset": pl.DataFrame(
            {"scoreset": [ss.name], "reward_form": [ss.reward_form], "logp_floor": [ss.logp_floor]}
        ),
        "evaluators": pl.DataFrame(
            {"evaluator": list(ss.evaluator_weights), "weight": list(ss.evaluator_weights.values())}
        ),
        "questions": questions_table(ss),
    }
    if (ev := eval_table(run)).height:
        out["eval"] = ev
    if probe_prompts:
        out["probe"] = probe_table(run, ss, probe_prompts)
    if compare_to:
        other = load(run, compare_to)
        out["totals"] = pl.concat([out["totals"], stats.totals(other).collect()], how="diagonal")  # phase: one side
        out["compare"] = cmp.compare(ss, other)
        out["changed"] = cmp.most_changed(ss, other)
    return out
