"""Where the data set has labels: does p_yes separate correct rollouts from incorrect ones?"""

from __future__ import annotations

import polars as pl

from rlme_pipeline.algorithm.answers import is_correct
from rlme_pipeline.algorithm.rewards import component
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
    a mean summed in another order differs in its last bits (evidence.json must not). `reward_f` is the
    judgement's reward component as the reward sums it: f (the score set's reward form, with its floor)
    turned by the sign of v_j * w_k, so that higher always means more reward."""
    return (
        ss.scores.filter(pl.col("status") == OK)
        .join(reward_signs(ss).lazy(), on=["evaluator", "question_id"], how="left")
        .select(
            "rollout_id",
            "evaluator",
            "question_id",
            "p_yes",
            reward_f=component(ss.reward_form, ss.logp_floor) * pl.col("sign").fill_null(1.0),
        )
        .join(correctness(ss), on="rollout_id", how="inner")
        .sort("evaluator", "question_id", "rollout_id")
    )


def reward_signs(ss: Scoreset) -> pl.DataFrame:
    """evaluator, question_id -> -1 where v_j * w_k < 0 (a penalising judgement: more P(yes), less reward),
    else 1 (weight 0, a watched question, ranks as if it counted). With phases, a question's last weight."""
    weights = dict(ss.question_weights)
    if ss.phases is not None:
        for r in ss.phases.sort("iteration", descending=True).iter_rows(named=True):
            weights.setdefault(r["question_id"], r["weight"])
    rows = [(e, q, -1.0 if v * w < 0 else 1.0) for e, v in ss.evaluator_weights.items() for q, w in weights.items()]
    return pl.DataFrame(
        rows, schema={"evaluator": pl.String, "question_id": pl.String, "sign": pl.Float64}, orient="row"
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
    """Per evaluator x question against correctness: two AUROCs (Mann-Whitney, ties counted half), because
    they rank different scores and can disagree (0.4 and 0.9 for the same judgements):

        auroc_reward  ranks the reward component (reward_f): what training climbs, so the one that says
                      whether the policy can gain by pleasing this judge instead of being right
        auroc_p_yes   ranks p_yes, P(yes) normalised over the yes/no mass: the judge's stated belief
        auroc         = auroc_p_yes, the column's name before both existed (kept for old readers)

    and accuracy of `p_yes > 0.5`. AUROCs are null when a cell has only correct or only incorrect rollouts."""
    keys = ["evaluator", "question_id"]
    pos = pl.col("correct").sum()
    return (
        judged(ss)
        .group_by(keys)
        .agg(
            n=pl.len(),
            n_correct=pos.cast(pl.Int64),
            auroc_reward=auroc_expr(pl.col("reward_f"), pl.col("correct")),
            auroc_p_yes=auroc_expr(pl.col("p_yes"), pl.col("correct")),
            accuracy_at_0_5=((pl.col("p_yes") > 0.5) == pl.col("correct")).mean(),
            p_yes_correct=pl.col("p_yes").filter(pl.col("correct")).mean(),
            p_yes_incorrect=pl.col("p_yes").filter(~pl.col("correct")).mean(),
        )
        .with_columns(auroc=pl.col("auroc_p_yes"))
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
