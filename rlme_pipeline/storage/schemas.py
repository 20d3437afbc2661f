"""The Parquet tables of a run, defined once. Every writer casts to these and every reader can rely on them.

Bump SCHEMA_VERSION when a column changes meaning or type; manifests record it per file.
"""

from __future__ import annotations

import polars as pl

SCHEMA_VERSION = 1

ROLLOUTS = pl.Schema(
    {
        "run_id": pl.String,
        "iteration": pl.Int32,
        "rollout_id": pl.String,  # hash(run, iteration, prompt_id, sample_index): stable across resumes
        "prompt_id": pl.String,
        "sample_index": pl.Int32,
        "prompt": pl.String,  # the dataset's prompt text, before the chat template
        "completion": pl.String,
        "prompt_token_ids": pl.List(pl.Int32),  # what the policy saw, so the update never re-tokenises
        "completion_token_ids": pl.List(pl.Int32),
        "behavior_logprobs": pl.List(pl.Float32),  # log pi_behavior(y_t) at the sampling temperature
        "finish_reason": pl.String,  # "stop" (eos) or "length"
        "label": pl.String,  # nullable; audit only
        "policy_version": pl.String,  # sha256 of the weights that generated it
    }
)

SCORES = pl.Schema(
    {
        "rollout_id": pl.String,
        "iteration": pl.Int32,
        "scoreset": pl.String,  # "train" for training scores; the re-score name otherwise
        "evaluator": pl.String,
        "question_id": pl.String,
        "logp_yes": pl.Float64,  # log P(positive answers) at the position after the question
        "logp_no": pl.Float64,
        "p_yes": pl.Float64,  # normalised over yes/no mass: p / (p + q)
        "status": pl.String,  # "ok" or an error kind; non-ok rows have null numbers
        "evaluator_version": pl.String,
        "question_sha": pl.String,
    }
)

REWARDS = pl.Schema(
    {
        "rollout_id": pl.String,
        "prompt_id": pl.String,
        "iteration": pl.Int32,
        "reward": pl.Float64,  # NaN when any component failed: masked out of the loss
        "advantage": pl.Float64,
        "n_components": pl.Int32,
        "n_failed": pl.Int32,
    }
)

EVAL = pl.Schema(
    {
        "rollout_id": pl.String,  # "eval/" + hash(run, iteration, prompt_id, sample_index): apart from training's
        "iteration": pl.Int32,  # the iteration whose update made the evaluated policy
        "prompt_id": pl.String,
        "sample_index": pl.Int32,  # 0: the one completion (greedy by default); 1..k: eval.samples' samples
        "prompt": pl.String,
        "completion": pl.String,
        "label": pl.String,  # nullable
        "answer": pl.String,  # the answer read off the completion (answers.py); null when none
        "correct": pl.Boolean,  # exact match against the label; null without a label
        "reward": pl.Float64,  # the judges' reward (training's formula); NaN when a judgement failed, null: none
        "completion_tokens": pl.Int32,
        "finish_reason": pl.String,
        "policy_version": pl.String,
    }
)

TABLES = {"rollouts": ROLLOUTS, "scores": SCORES, "rewards": REWARDS, "eval": EVAL}

OK = "ok"


def conform(df: pl.DataFrame, table: str) -> pl.DataFrame:
    """Select and cast to the table's schema; a missing column is a programming error, said plainly."""
    schema = TABLES[table]
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"{table} table is missing columns {missing}")
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])
