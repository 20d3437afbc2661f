"""score: every rollout x evaluator x meta-question, read off the evaluator's next-token distribution."""

from __future__ import annotations

import polars as pl

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config
from rlme_pipeline.judging.judges import Evaluator, score_rollouts
from rlme_pipeline.storage.schemas import OK


def score(
    cfg: Config, rollouts: pl.DataFrame, evaluators: list[Evaluator], backends: Backends
) -> tuple[pl.DataFrame, dict]:
    """(scores, metrics) for the training score set. A failed judgement is a row with its status (and a
    NaN reward later), so the share of them is the stage's first health metric."""
    df = score_rollouts(rollouts, evaluators, cfg.questions, cfg.scoring, "train", backends)
    return df, {"failed_share": float((df["status"] != OK).mean()) if df.height else 0.0}
