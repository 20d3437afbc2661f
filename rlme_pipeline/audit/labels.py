"""Where the data set has labels: does p_yes separate correct rollouts from incorrect ones?"""

from __future__ import annotations

import polars as pl

from rlme_pipeline.answers import is_correct
from rlme_pipeline.audit.sources import Scoreset
from rlme_pipeline.schemas import OK


def correctness(ss: Scoreset) -> pl.LazyFrame:
    """rollout_id -> correct (bool), for labelled rollouts only."""
    return ss.rollouts.filter(pl.col("label").is_not_null()).select(
        "rollout_id",
        correct=pl.struct("completion", "label").map_elements(
            lambda r: is_correct(r["completion"], r["label"]), return_dtype=pl.Boolean
        ),
    )


def judged(ss: Scoreset) -> pl.LazyFrame:
    return (
        ss.scores.filter(pl.col("status") == OK)
        .select("rollout_id", "evaluator", "question_id", "p_yes")
        .join(correctness(ss), on="rollout_id", how="inner")
    )


def label_metrics(ss: Scoreset) -> pl.DataFrame:
    """AUROC (Mann-Whitney, ties counted half) and accuracy of `p_yes > 0.5` against correctness.
    AUROC is null when a cell has only correct or only incorrect rollouts."""
    keys = ["evaluator", "question_id"]
    pos = pl.col("correct").sum()
    return (
        judged(ss)
        .with_columns(rank=pl.col("p_yes").rank("average").over(keys))
        .group_by(keys)
        .agg(
            n=pl.len(),
            n_correct=pos.cast(pl.Int64),
            rank_sum_correct=pl.col("rank").filter(pl.col("correct")).sum(),
            accuracy_at_0_5=((pl.col("p_yes") > 0.5) == pl.col("correct")).mean(),
            p_yes_correct=pl.col("p_yes").filter(pl.col("correct")).mean(),
            p_yes_incorrect=pl.col("p_yes").filter(~pl.col("correct")).mean(),
        )
        .with_columns(
            auroc=pl.when((pl.col("n_correct") > 0) & (pl.col("n_correct") < pl.col("n"))).then(
                (pl.col("rank_sum_correct") - pl.col("n_correct") * (pl.col("n_correct") + 1) / 2)
                / (pl.col("n_correct") * (pl.col("n") - pl.col("n_correct")))
            )
        )
        .drop("rank_sum_correct")
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
