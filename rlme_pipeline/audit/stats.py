"""Per evaluator x question x iteration statistics, question correlations, evaluator agreement."""

from __future__ import annotations

import polars as pl

from rlme_pipeline.algorithm.rewards import component
from rlme_pipeline.audit.sources import Scoreset
from rlme_pipeline.storage.schemas import OK

QUANTILES = (0.1, 0.5, 0.9)
BINS = 20  # P(yes) histogram bins


def summary(ss: Scoreset) -> pl.LazyFrame:
    """count, failures, mean/std/quantiles of p_yes and of the (unweighted) reward component f(p)."""
    ok = pl.col("status") == OK
    aggs = [pl.len().alias("n"), ok.sum().cast(pl.Int64).alias("n_ok"), (~ok).sum().cast(pl.Int64).alias("n_failed")]
    for col in ("p_yes", "f"):
        aggs += [pl.col(col).mean().alias(f"{col}_mean"), pl.col(col).std(ddof=0).alias(f"{col}_std")]
        aggs += [pl.col(col).quantile(q, "linear").alias(f"{col}_q{int(q * 100):02d}") for q in QUANTILES]
    ev = pl.DataFrame(
        {"evaluator": list(ss.evaluator_weights), "v": list(ss.evaluator_weights.values())},
        schema={"evaluator": pl.String, "v": pl.Float64},
    )
    if ss.phases is None:  # one question set throughout
        qw = pl.DataFrame({"question_id": list(ss.question_weights), "w": list(ss.question_weights.values())})
        keys = ["evaluator", "question_id"]
    else:  # the weights each iteration's phase gave its questions
        qw = ss.phases.select("iteration", "phase", "question_id", w="weight")
        keys = ["iteration", "evaluator", "question_id"]
    weights = ev.join(qw, how="cross").with_columns(weight=pl.col("v") * pl.col("w")).drop("v", "w").lazy()
    return (
        ss.scores.with_columns(f=component(ss.reward_form, ss.logp_floor))
        .group_by("iteration", "evaluator", "question_id")
        .agg(aggs)
        .join(weights, on=keys, how="left")
        .with_columns(contribution_mean=pl.col("weight") * pl.col("f_mean"), scoreset=pl.lit(ss.name))
        .sort("iteration", "evaluator", "question_id")
    )


def totals(ss: Scoreset) -> pl.LazyFrame:
    """The total reward per iteration, the number training climbs: mean, spread and quantiles over the
    rollouts it rewards; masked rollouts (reward NaN, a failed judgement) are counted apart."""
    r = pl.col("reward").filter(pl.col("reward").is_not_nan())
    aggs = [
        pl.len().alias("n"),
        pl.col("reward").is_nan().sum().cast(pl.Int64).alias("n_masked"),
        r.mean().alias("reward_mean"),
        r.std(ddof=0).alias("reward_std"),
    ]
    aggs += [r.quantile(q, "linear").alias(f"reward_q{int(q * 100):02d}") for q in QUANTILES]
    out = ss.rewards.group_by("iteration").agg(aggs).with_columns(scoreset=pl.lit(ss.name))
    if (phase := ss.phase_of()) is not None:  # the question set changed: which phase each point belongs to
        out = out.join(phase.lazy(), on="iteration", how="left")
    return out.sort("iteration")


def histograms(ss: Scoreset, bins: int = BINS) -> pl.LazyFrame:
    """Rollouts per P(yes) bin, per evaluator x question (failed judgements have no P(yes))."""
    return (
        ss.scores.filter(pl.col("p_yes").is_not_null())
        .with_columns(bin=(pl.col("p_yes") * bins).floor().clip(0, bins - 1).cast(pl.Int32))
        .group_by("evaluator", "question_id", "bin")
        .agg(n=pl.len())
        .sort("evaluator", "question_id", "bin")
    )


def failures(ss: Scoreset) -> pl.LazyFrame:
    return (
        ss.scores.filter(pl.col("status") != OK)
        .group_by("iteration", "evaluator", "question_id", "status")
        .agg(n=pl.len())
        .sort("iteration", "evaluator", "question_id", "status")
    )


def _wide(scores: pl.LazyFrame, over: str) -> pl.DataFrame:
    """p_yes with one column per `over` value (questions or evaluators), one row per rollout x the other."""
    other = "evaluator" if over == "question_id" else "question_id"
    return (
        scores.filter(pl.col("status") == OK)
        .select("rollout_id", other, over, "p_yes")
        .collect()
        .pivot(on=over, index=["rollout_id", other], values="p_yes")
    )


def pairwise(scores: pl.LazyFrame, over: str, names: list[str], with_agreement: bool) -> pl.DataFrame:
    """For every pair of `over` values (questions or evaluators) in `names` order, within each value of the
    other key: Pearson correlation of p_yes and, optionally, the share of rollouts on the same side of 0.5.
    Takes a scores table, not a Scoreset, so that evolve's paraphrase stability (evolve/rank.py) uses it too."""
    wide = _wide(scores, over)
    group = "evaluator" if over == "question_id" else "question_id"
    a_col, b_col = ("question_a", "question_b") if over == "question_id" else ("evaluator_a", "evaluator_b")
    rows = []
    for key, g in wide.group_by(group):
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if a not in g.columns or b not in g.columns:
                    continue
                both = g.select(a, b).drop_nulls()
                row = {
                    group: key[0],
                    a_col: a,
                    b_col: b,
                    "n": both.height,
                    "pearson": both.select(pl.corr(a, b)).item() if both.height > 1 else None,
                }
                if with_agreement:
                    row["agreement"] = (
                        both.select(((pl.col(a) > 0.5) == (pl.col(b) > 0.5)).mean()).item() if both.height else None
                    )
                rows.append(row)
    schema = {group: pl.String, a_col: pl.String, b_col: pl.String, "n": pl.Int64, "pearson": pl.Float64}
    if with_agreement:
        schema["agreement"] = pl.Float64
    return pl.DataFrame(rows, schema=schema).sort(group, a_col, b_col)


def correlations(ss: Scoreset) -> pl.DataFrame:
    """Pearson correlation of p_yes between every pair of questions, per evaluator."""
    return pairwise(ss.scores, "question_id", ss.question_ids(), with_agreement=False)


def agreement(ss: Scoreset) -> pl.DataFrame:
    """Between every pair of evaluators, per question: correlation of p_yes and the share of rollouts
    on which both land on the same side of 0.5."""
    return pairwise(ss.scores, "evaluator", sorted(ss.evaluator_weights), with_agreement=True)
