"""eval: the policy an iteration's update produced, on held-out prompts (config `eval`, off by default).

One completion per prompt (greedy, or sampled with eval.seed), then exact-match accuracy where the prompt
has a label (answers.py, as the label reward and the audit read answers) and, with eval.judges, the
judges' reward: the training reward's formula (rewards.py) over the same evaluators and questions, as
they judge the next iteration (a live-self evaluator is the evaluated policy). It observes the policy
and changes nothing training computes; the runner commits it with its iteration.
"""

from __future__ import annotations

import polars as pl

from rlme_pipeline.algorithm.answers import extract_answer, is_correct
from rlme_pipeline.algorithm.rewards import compute_rewards
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config
from rlme_pipeline.judging.judges import Evaluator, score_rollouts
from rlme_pipeline.stages.generate import Sampling
from rlme_pipeline.storage.schemas import OK

PREFIX = "eval/"  # of the metrics, and of the eval rows' rollout ids


def sampling(cfg: Config, iteration: int) -> Sampling:
    e, g = cfg.eval, cfg.generation
    return Sampling(
        samples=1,
        max_new_tokens=e.max_new_tokens or g.max_new_tokens,
        temperature=e.temperature,
        top_p=g.top_p if e.temperature else 1.0,
        batch_size=g.batch_size,
        seed=(e.seed, "eval", iteration),
        stage="eval",
    )


def evaluate(
    cfg: Config, rollouts: pl.DataFrame, evaluators: list[Evaluator], backends: Backends
) -> tuple[pl.DataFrame, dict]:
    """(eval table, metrics) for held-out rollouts (generate's rows). No evaluators: accuracy only."""
    rollouts = rollouts.with_columns(rollout_id=PREFIX + pl.col("rollout_id"))
    table = with_correct(rollouts, cfg.eval.extractor)
    metrics = {
        f"{PREFIX}prompts": table.height,
        f"{PREFIX}completion_tokens_mean": float(table["completion_tokens"].mean()),
    }
    labelled = table.filter(pl.col("correct").is_not_null())
    if labelled.height:
        metrics[f"{PREFIX}accuracy"] = float(labelled["correct"].mean())
        metrics[f"{PREFIX}labelled"] = labelled.height
    if evaluators:
        scores = score_rollouts(rollouts, evaluators, cfg.questions, cfg.scoring, "eval", backends, label="eval")
        rewards = compute_rewards(
            scores,
            rollouts,
            {e.name: e.weight for e in cfg.evaluators},
            {q.id: q.weight for q in cfg.questions},
            form=cfg.scoring.reward_form,
            floor=cfg.scoring.logp_floor,
        )
        table = table.drop("reward").join(rewards.select("rollout_id", "reward"), on="rollout_id", how="left")
        valid = table["reward"].filter(table["reward"].is_not_nan())
        metrics[f"{PREFIX}reward_mean"] = float(valid.mean()) if valid.len() else None
        metrics[f"{PREFIX}failed_share"] = float((scores["status"] != OK).mean()) if scores.height else 0.0
    return table.sort("prompt_id"), metrics


def with_correct(rollouts: pl.DataFrame, extractor: str) -> pl.DataFrame:
    """The eval table's columns: the answer read off each completion, and whether it is correct against
    the label (answers.is_correct: no answer is not correct; null without a label); reward left null."""
    rows = [
        {
            **r,
            "answer": extract_answer(r["completion"], extractor),
            "correct": None if r["label"] is None else is_correct(r["completion"], r["label"], extractor),
            "completion_tokens": len(r["completion_token_ids"]),
        }
        for r in rollouts.iter_rows(named=True)
    ]
    schema = {"answer": pl.String, "correct": pl.Boolean, "completion_tokens": pl.Int32}
    return pl.DataFrame(rows, schema_overrides=schema).with_columns(reward=pl.lit(None, pl.Float64))
