"""Where the data set has labels: does p_yes separate correct rollouts from incorrect ones?"""

from __future__ import annotations

import polars as pl

from rlme_pipeline.algorithm.answers import is_correct
from rlme_pipeline.audit.sources import Scoreset
from rlme_pipeline.storage.schemas import OK


def correctness(ss: Scoreset) -> pl.LazyFrame:
    """rollout_id -> correct (bool), for labelled rollouts only, read with the run's answer format (the one
    its label reward and eval use)."""
    fmt = ss.answer_format
    return ss.rollouts.filter(pl.col("label").is_not_null()).select(
        "rollout_id",
        correct=pl.struct("completion", "label").map_elements(
            lambda r: is_correct(r["completion"], r["label"], fmt), return_dtype=pl.Boolean
        ),
    )


def judged(ss: Scoreset) -> pl.LazyFrame:
    """OK judgements of labelled rollouts, in a fixed order: a join's row order varies from run to run, and
    a mean summed in another order differs in its last bits (evidence.json must not)."""
    return (
        ss.scores.filter(pl.col("status") == OK)
        .select("rollout_id", "evaluator", "question_id", "p_yes")
        .join(correctness(ss), on="rollout_id", how="inner")
        .sort("evaluator", "question_id", "rollout_id")
    )


def auroc_expr(score: pl.Expr, positive: pl.Expr) -> pl.Expr:
    """AUROC of `score` for `positive` rows (Mann-Whitney, ties counted half) as an aggregation; null unless
    both classes are present. The one AUROC of the code base: the audit, `rlme evolve` and paper_mini use it."""
    n, n_pos = pl.len(), positive.cast(pl.Int64).sum()
    rank_sum = score.rank("average").filter(positive).sum()
    return pl.when((n_pos > 0) & (n_pos < n)).then((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))


def auroc(values, positive) -> float | None:
    """`auroc_expr` over two sequences (lists or Series): a float, or None unless both classes are present."""
    df = pl.DataFrame({"v": pl.Series(values, dtype=pl.Float64), "p": pl.Series(positive, dtype=pl.Boolean)})
    value = df.select(auroc_expr(pl.col("v"), pl.col("p"))).item()
    return None if value is None else float(value)


def label_metrics(ss: Scoreset) -> pl.DataFrame:
    """AUROC (Mann-Whitney, ties counted half) and accuracy of `p_yes > 0.5` against correctness.
    AUROC is null when a cell has only correct or only incorrect rollouts."""
    keys = ["evaluator", "question_id"]
    pos = pl.col("correct").sum()
    return (
        judged(ss)
        .group_by(keys)
        .agg(
            n=pl.len(),
            n_correct=pos.cast(pl.Int64),
            auroc=auroc_expr(pl.col("p_yes"), pl.col("correct")),
            accuracy_at_0_5=((pl.col("p_yes") > 0.5) == pl.col("correct")).mean(),
            p_yes_correct=pl.col("p_yes").filter(pl.col("correct")).mean(),
            p_yes_incorrect=pl.col("p_yes").filter(~pl.col("correct")).mean(),
        )
        .sort(keys)
        .collect()
    )


def calibration(ss: Scoreset, bins: int = 10) -> pl.DataFrame:
    """Share correct per p_yes bin: a calibrated judge lies on the diagonal."""
    return (
        judged(ss)
        .with_columns(bin=(pl.col("p_yes") * bins).floor().clip(0, bins - 1).cast(pl.Int32))
        .group_by("evaluator", "question_id", "bin")
        .agg(n=pl.len(), p_yes_mean=pl.col("p_yes").mean(), correct_share=pl.col("correct").mean())
        .sort("evaluator", "question_id", "bin")
        .collect()
    )
