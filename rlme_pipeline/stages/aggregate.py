"""aggregate: rewards and advantages from the scores table."""

from __future__ import annotations

import polars as pl

from rlme_pipeline.algorithm.label_reward import mix_label_rewards
from rlme_pipeline.algorithm.rewards import component, compute_rewards
from rlme_pipeline.config import Config


def rewards_for(cfg: Config, scores: pl.DataFrame, rollouts: pl.DataFrame) -> pl.DataFrame:
    return rewards_and_metrics(cfg, scores, rollouts)[0]


def judges_reward(cfg: Config, scores: pl.DataFrame, rollouts: pl.DataFrame, scale_std: bool = False) -> pl.DataFrame:
    """The judges' reward (and advantage) as the config weighs it: its evaluators, questions, reward form and
    floor. Without the label-reward mix: what eval, judge-check and evolve rank by."""
    return compute_rewards(
        scores,
        rollouts,
        {e.name: e.weight for e in cfg.evaluators},
        {q.id: q.weight for q in cfg.questions},
        form=cfg.scoring.reward_form,
        floor=cfg.scoring.logp_floor,
        scale_std=scale_std,
    )


def rewards_and_metrics(cfg: Config, scores: pl.DataFrame, rollouts: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    sc = cfg.scoring
    rewards = judges_reward(cfg, scores, rollouts, scale_std=cfg.algorithm.scale_advantage_std)
    lc = cfg.label_reward
    if lc is None or lc.share == 0:
        return rewards, {}
    return mix_label_rewards(
        rewards,
        rollouts,
        lc,
        fmt=cfg.answer_format(),
        form=sc.reward_form,
        floor=sc.logp_floor,
        scale_std=cfg.algorithm.scale_advantage_std,
    )


def component_metrics(cfg: Config, scores: pl.DataFrame) -> dict[str, float]:
    """Mean/std of f(p) per evaluator and question (unweighted), the numbers a user watches for drift."""
    stats = (
        scores.with_columns(f=component(cfg.scoring.reward_form, cfg.scoring.logp_floor))
        .group_by("evaluator", "question_id")
        .agg(mean=pl.col("f").mean(), std=pl.col("f").std(ddof=0), p_yes=pl.col("p_yes").mean())
        .sort("evaluator", "question_id")
    )
    out = {}
    for r in stats.iter_rows(named=True):
        for k in ("mean", "std", "p_yes"):
            out[f"{r['evaluator']}/{r['question_id']}/{k}"] = r[k]
    return out


def aggregate(cfg: Config, scores: pl.DataFrame, rollouts: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """(rewards, metrics): rewards and group-centred advantages, and the numbers a user watches."""
    rewards, label_metrics = rewards_and_metrics(cfg, scores, rollouts)
    valid = rewards.filter(pl.col("reward").is_not_nan())
    return rewards, {
        "reward_mean": valid["reward"].mean() if valid.height else None,
        "reward_std": valid["reward"].std(ddof=0) if valid.height else None,
        "masked_rollouts": rewards.height - valid.height,
        **component_metrics(cfg, scores),
        **label_metrics,
    }
