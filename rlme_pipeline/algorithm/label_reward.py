"""Rule-based exact-match reward beside the meta-questions (RLVR, and the paper's RLME-nGT remedy).

Which rollouts get the label reward is a pure function of the rollout id and the share, so a resumed
run (or a re-aggregation) picks exactly the same ones. Labels are read here and nowhere else in training.
"""

from __future__ import annotations

import hashlib

import polars as pl

from rlme_pipeline.algorithm.answers import is_correct
from rlme_pipeline.algorithm.rewards import with_advantages
from rlme_pipeline.config import LabelRewardConfig


def selected(rollout_id: str, share: float) -> bool:
    """True for a deterministic `share` of rollout ids (uniform hash in [0, 1) below the share)."""
    if share >= 1:
        return True
    u = int(hashlib.sha256(f"label-reward/{rollout_id}".encode()).hexdigest()[:15], 16) / 16**15
    return u < share


def values(form: str, floor: float) -> tuple[float, float]:
    """(correct, wrong) rewards in the judge reward's units: what a perfect, confident evaluator gives."""
    return (1.0, 0.0) if form == "p" else (0.0, floor)


def mix_label_rewards(
    rewards: pl.DataFrame,
    rollouts: pl.DataFrame,
    lc: LabelRewardConfig,
    *,
    fmt: str,
    form: str,
    floor: float,
    scale_std: bool = False,
) -> tuple[pl.DataFrame, dict]:
    """Replace the reward of the selected rollouts (with a label) by the exact-match reward (answers read
    with `fmt`, the run's answer format: Config.answer_format), then recompute the group advantages.
    Returns the rewards table (same columns) and summary metrics."""
    good, bad = values(form, floor)
    rows = []
    for r in rollouts.select("rollout_id", "completion", "label").iter_rows(named=True):
        if r["label"] is not None and selected(r["rollout_id"], lc.share):
            rows.append((r["rollout_id"], lc.weight * (good if is_correct(r["completion"], r["label"], fmt) else bad)))
    lab = pl.DataFrame(rows, schema={"rollout_id": pl.String, "label_reward": pl.Float64}, orient="row")
    cols = rewards.columns
    out = rewards.join(lab, on="rollout_id", how="left").with_columns(
        # a label-rewarded rollout has one component (the rule) and it cannot fail
        reward=pl.coalesce("label_reward", pl.col("reward").fill_null(float("nan"))),
        n_components=pl.when(pl.col("label_reward").is_not_null())
        .then(1)
        .otherwise(pl.col("n_components"))
        .cast(pl.Int32),
        n_failed=pl.when(pl.col("label_reward").is_not_null()).then(0).otherwise(pl.col("n_failed")).cast(pl.Int32),
    )
    out = with_advantages(out, scale_std).select(cols)
    metrics = {"label_rewarded_share": lab.height / max(rollouts.height, 1)}
    return out, metrics
