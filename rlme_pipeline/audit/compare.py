"""Two score sets of the same rollouts: how rewards and advantages moved."""

from __future__ import annotations

import polars as pl

from rlme_pipeline.audit.sources import Scoreset


def joined(a: Scoreset, b: Scoreset) -> pl.LazyFrame:
    cols = ["rollout_id", "prompt_id", "iteration", "reward", "advantage"]
    return (
        a.rewards.select(cols)
        .join(b.rewards.select("rollout_id", "reward", "advantage"), on="rollout_id", suffix="_b")
        .rename({"reward": "reward_a", "advantage": "advantage_a"})
        .with_columns(
            reward_diff=pl.col("reward_b") - pl.col("reward_a"),
            advantage_diff=pl.col("advantage_b") - pl.col("advantage_a"),
        )
    )


def compare(a: Scoreset, b: Scoreset) -> pl.DataFrame:
    """Per iteration: mean reward/advantage differences, share of advantages that change sign (among
    rollouts with a non-zero advantage in both), and prompt groups whose reward variance collapses to 0
    in b while it was positive in a (they stop teaching anything)."""
    j = joined(a, b).filter(pl.col("reward_a").is_not_nan() & pl.col("reward_b").is_not_nan())
    groups = (
        j.group_by("iteration", "prompt_id")
        .agg(var_a=pl.col("reward_a").var(ddof=0), var_b=pl.col("reward_b").var(ddof=0))
        .group_by("iteration")
        .agg(
            groups=pl.len(),
            collapsed_groups=((pl.col("var_a") > 1e-12) & (pl.col("var_b") <= 1e-12)).sum().cast(pl.Int64),
            zero_variance_groups_a=(pl.col("var_a") <= 1e-12).sum().cast(pl.Int64),
            zero_variance_groups_b=(pl.col("var_b") <= 1e-12).sum().cast(pl.Int64),
        )
    )
    nonzero = (pl.col("advantage_a") != 0) & (pl.col("advantage_b") != 0)
    per_it = j.group_by("iteration").agg(
        n=pl.len(),
        reward_diff_mean=pl.col("reward_diff").mean(),
        reward_diff_abs_mean=pl.col("reward_diff").abs().mean(),
        advantage_diff_mean=pl.col("advantage_diff").mean(),
        advantage_diff_abs_mean=pl.col("advantage_diff").abs().mean(),
        sign_change_share=((pl.col("advantage_a").sign() != pl.col("advantage_b").sign()).filter(nonzero)).mean(),
        reward_pearson=pl.corr("reward_a", "reward_b"),
    )
    return (
        per_it.join(groups, on="iteration")
        .with_columns(scoreset_a=pl.lit(a.name), scoreset_b=pl.lit(b.name))
        .sort("iteration")
        .collect()
    )


def most_changed(a: Scoreset, b: Scoreset, n: int = 20) -> pl.DataFrame:
    """The rollouts whose advantage moved most, with their text, for reading."""
    top = (
        joined(a, b)
        .filter(pl.col("advantage_diff").is_not_nan())
        .sort(pl.col("advantage_diff").abs(), descending=True)
        .head(n)
    )
    return (
        top.join(a.rollouts.select("rollout_id", "prompt", "completion", "label"), on="rollout_id", how="left")
        .sort(pl.col("advantage_diff").abs(), descending=True)
        .collect()
    )
