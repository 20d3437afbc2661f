"""Rewards from judgements: r = sum_j sum_k v_j w_k f(p_jk), and group-centred advantages.

f is one of
    logp       max(log P(yes), floor)               the paper's reward; the floor bounds log 0
    norm_logp  max(log (P(yes) / (P(yes)+P(no))), floor)
    p          P(yes)
A failed judgement makes its rollout's reward NaN (never 0), and NaN rewards are left out of the group
mean and masked out of the loss. A judgement at weight 0 (a watched question, evolve's paraphrases) is not a
component of the reward: its failure stays in the scores table's status and voids nothing.
"""

from __future__ import annotations

import polars as pl

from rlme_pipeline.storage.schemas import OK

FORMS = ("logp", "norm_logp", "p")


def component(form: str, floor: float) -> pl.Expr:
    """f(p_jk) for one scores row; null where the judgement failed."""
    if form == "logp":
        v = pl.max_horizontal(pl.col("logp_yes"), pl.lit(floor))
    elif form == "norm_logp":
        v = pl.max_horizontal(pl.col("p_yes").log(), pl.lit(floor))
    elif form == "p":
        v = pl.col("logp_yes").exp()
    else:
        raise ValueError(f"scoring.reward_form: {form!r} is not one of {FORMS}")
    return pl.when(pl.col("status") == OK).then(v).otherwise(None)


def compute_rewards(
    scores: pl.DataFrame,
    rollouts: pl.DataFrame,
    evaluator_weights: dict[str, float],
    question_weights: dict[str, float],
    *,
    form: str,
    floor: float,
    scale_std: bool = False,
) -> pl.DataFrame:
    """One row per rollout (all of `rollouts`, even those with no scores) with reward and advantage."""
    weights = pl.DataFrame(
        [(e, q, ve * wq) for e, ve in evaluator_weights.items() for q, wq in question_weights.items() if ve * wq],
        schema={"evaluator": pl.String, "question_id": pl.String, "weight": pl.Float64},
        orient="row",
    )
    parts = (
        scores.join(weights, on=["evaluator", "question_id"], how="inner")
        .with_columns(term=component(form, floor) * pl.col("weight"))
        .group_by("rollout_id")
        .agg(
            reward=pl.col("term").sum(),
            n_present=pl.len(),
            n_null=pl.col("term").is_null().sum(),
        )
    )
    expected = weights.height  # every evaluator x question of nonzero weight
    out = (
        rollouts.select("rollout_id", "prompt_id", "iteration")
        .join(parts, on="rollout_id", how="left")
        .with_columns(
            n_components=pl.lit(expected, pl.Int32),
            # missing rows count as failed: a judgement that never happened is not a zero
            n_failed=(pl.col("n_null").fill_null(0) + expected - pl.col("n_present").fill_null(0)).cast(pl.Int32),
        )
        # A missing or failed component leaves the reward undefined, not smaller.
        # (With no weighted component at all it stays null: no reward, never a silent 0; label_reward may set it.)
        .with_columns(reward=pl.when(pl.col("n_failed") == 0).then(pl.col("reward")).otherwise(float("nan")))
    )
    return with_advantages(out, scale_std).select(
        "rollout_id", "prompt_id", "iteration", "reward", "advantage", "n_components", "n_failed"
    )


def with_advantages(df: pl.DataFrame, scale_std: bool = False) -> pl.DataFrame:
    """Group-centred advantage (Dr. GRPO) over the finite rewards of each prompt; NaN stays NaN."""
    valid = pl.col("reward").filter(pl.col("reward").is_not_nan())
    adv = pl.col("reward") - valid.mean().over("prompt_id")
    if scale_std:
        adv = adv / (valid.std(ddof=0).over("prompt_id") + 1e-6)
    return df.with_columns(
        advantage=pl.when(pl.col("reward").is_nan()).then(float("nan")).otherwise(adv.fill_null(float("nan")))
    )
