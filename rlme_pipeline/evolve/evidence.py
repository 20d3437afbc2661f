"""What the proposer is shown: where the run's judges look weak, read from its committed iterations.

    top_rollouts              the highest-reward rollouts: what the policy is being pushed towards
    probe_hits                master keys and vacuous answers judged positive (judging.run_probe)
    evaluator_disagreements   per question, evaluator pairs that land on different sides of 0.5, with examples
    question_disagreements    per evaluator, question pairs whose P(yes) part most, with examples
    label_disagreements       where a label column exists: AUROC per judgement, and high-reward wrong
                              / low-reward right rollouts

The tables come from the audit (audit/stats.py, audit/labels.py); this module only picks the rows and
examples a reader (or a model) needs, as plain JSON. `render` shows at most `rows` entries per
list, so the prompt can be shrunk to fit a proposer's context.
"""

from __future__ import annotations

import dataclasses
import math

import polars as pl
import yaml

from rlme_pipeline.audit import labels, stats
from rlme_pipeline.audit.sources import Scoreset, load
from rlme_pipeline.scoreset import TRAIN
from rlme_pipeline.storage.run import Run

EXAMPLES = 5  # rollouts kept per section in evidence.json; the prompt may show fewer


def training_scores(run: Run, iterations: list[int]) -> Scoreset:
    """The training score set restricted to `iterations`."""
    ss = load(run, TRAIN)
    keep = pl.col("iteration").is_in(iterations)
    return dataclasses.replace(
        ss, scores=ss.scores.filter(keep), rewards=ss.rewards.filter(keep), rollouts=ss.rollouts.filter(keep)
    )


def _texts(ss: Scoreset, ids: pl.DataFrame, chars: int) -> pl.DataFrame:
    """The prompt and completion (cut to `chars`) of the rollouts in `ids`, in their order."""
    cut = lambda c: pl.col(c).str.slice(0, chars)  # noqa: E731
    text = ss.rollouts.select("rollout_id", cut("prompt"), cut("completion"), "label").collect()
    return ids.join(text, on="rollout_id", how="left", maintain_order="left")


def top_rollouts(ss: Scoreset, n: int, chars: int) -> list[dict]:
    top = (
        ss.rewards.filter(pl.col("reward").is_not_nan())
        .sort("reward", descending=True)
        .head(n)
        .select("rollout_id", "iteration", "reward")
        .collect()
    )
    return _texts(ss, top, chars).drop("rollout_id").to_dicts()


def probe_hits(probe: pl.DataFrame) -> list[dict]:
    """Rows of a probe table (judging.run_probe) where some empty answer was judged positive, worst first."""
    hits = probe.filter(pl.col("positive") > 0).sort(
        "share", "evaluator", "question_id", descending=[True, False, False]
    )
    return hits.select("evaluator", "question_id", "kind", "share", "p_yes_mean").to_dicts()


def _split_examples(wide: pl.DataFrame, a: str, b: str, key: str, n: int) -> pl.DataFrame:
    return (
        wide.filter(pl.col(a).is_not_null() & pl.col(b).is_not_null())
        .with_columns(gap=(pl.col(a) - pl.col(b)).abs())
        .sort("gap", "rollout_id", descending=[True, False])
        .head(n)
        .select("rollout_id", key, pl.col(a).alias("p_yes_a"), pl.col(b).alias("p_yes_b"))
    )


def evaluator_disagreements(ss: Scoreset, n: int, chars: int) -> list[dict]:
    """Per question and evaluator pair: agreement at 0.5 and the rollouts they part on most."""
    out = []
    wide = stats._wide(ss.scores, "evaluator")
    for r in stats.agreement(ss).sort("agreement", "question_id", nulls_last=True).iter_rows(named=True):
        a, b = r["evaluator_a"], r["evaluator_b"]
        ex = _split_examples(wide.filter(pl.col("question_id") == r["question_id"]), a, b, "question_id", n)
        out.append({**r, "examples": _texts(ss, ex.drop("question_id"), chars).drop("rollout_id").to_dicts()})
    return out


def question_disagreements(ss: Scoreset, n: int, chars: int) -> list[dict]:
    """Per evaluator and question pair: the correlation of P(yes) and the rollouts they part on most."""
    out = []
    wide = stats._wide(ss.scores, "question_id")
    for r in stats.correlations(ss).sort("pearson", "evaluator", nulls_last=True).iter_rows(named=True):
        a, b = r["question_a"], r["question_b"]
        ex = _split_examples(wide.filter(pl.col("evaluator") == r["evaluator"]), a, b, "evaluator", n)
        out.append({**r, "examples": _texts(ss, ex.drop("evaluator"), chars).drop("rollout_id").to_dicts()})
    return out


def label_disagreements(ss: Scoreset, n: int, chars: int) -> dict | None:
    """None when no rollout has a label."""
    correct = labels.correctness(ss).collect()
    if not correct.height:
        return None
    rewarded = (
        ss.rewards.filter(pl.col("reward").is_not_nan())
        .select("rollout_id", "reward")
        .collect()
        .join(correct, on="rollout_id")
    )
    wrong = rewarded.filter(~pl.col("correct")).sort("reward", "rollout_id", descending=[True, False]).head(n)
    right = rewarded.filter(pl.col("correct")).sort("reward", "rollout_id").head(n)
    return {
        "correct_share": float(correct["correct"].mean()),
        "per_judgement": labels.label_metrics(ss).drop("auroc").to_dicts(),  # auroc_p_yes under its old name
        "high_reward_wrong": _texts(ss, wrong.drop("correct"), chars).drop("rollout_id").to_dicts(),
        "low_reward_right": _texts(ss, right.drop("correct"), chars).drop("rollout_id").to_dicts(),
    }


def collect(run: Run, iterations: list[int], probe: pl.DataFrame, n: int = EXAMPLES, chars: int = 400) -> dict:
    """The evidence of `iterations`, as JSON-ready data (written to the proposal as evidence.json)."""
    ss = training_scores(run, iterations)
    return settled(
        {
            "iterations": iterations,
            "questions": [{"id": q, "text": ss.question_texts[q], "weight": w} for q, w in ss.question_weights.items()],
            "evaluators": [{"name": e, "weight": v} for e, v in ss.evaluator_weights.items()],
            "top_rollouts": top_rollouts(ss, n, chars),
            "probe_hits": probe_hits(probe),
            "evaluator_disagreements": evaluator_disagreements(ss, n, chars),
            "question_disagreements": question_disagreements(ss, n, chars),
            "label_disagreements": label_disagreements(ss, n, chars),
        }
    )


def settled(x):
    """Floats to 12 significant digits. Polars' multi-threaded aggregations may sum a group in another order
    from one process to the next, moving a mean in its last bits; evidence.json is part of a write-once
    proposal that a resumed run must write byte for byte as an uninterrupted one does."""
    if isinstance(x, dict):
        return {k: settled(v) for k, v in x.items()}
    if isinstance(x, list):
        return [settled(v) for v in x]
    if isinstance(x, float) and math.isfinite(x):
        return float(f"{x:.12g}")
    return x


def render(evidence: dict, rows: int) -> str:
    """The evidence as compact YAML for a prompt, every list cut to its first `rows` entries (worst first)."""

    def cut(x):
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, list):
            return [cut(v) for v in x[:rows]]
        if isinstance(x, float):
            return round(x, 3)
        return x

    shown = {k: v for k, v in cut(evidence).items() if k not in ("questions", "evaluators", "iterations")}
    return yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, width=120)
