"""A score set as lazy frames: scores, rewards and the rollouts they judge, plus the weights they used.

'train' (or None) is the training data of the committed iterations; any other name is a committed score
set under scoresets/. Only files listed in a committed manifest are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from rlme_pipeline import scoreset
from rlme_pipeline.parquet_io import scan
from rlme_pipeline.run import ROLLOUTS_FILE, Run
from rlme_pipeline.scoreset import TRAIN


@dataclass
class Scoreset:
    name: str
    scores: pl.LazyFrame
    rewards: pl.LazyFrame
    rollouts: pl.LazyFrame  # rollout_id, iteration, prompt_id, prompt, completion, label
    evaluator_weights: dict[str, float]
    question_weights: dict[str, float]
    question_texts: dict[str, str]
    reward_form: str
    logp_floor: float


ROLLOUT_COLUMNS = ["rollout_id", "iteration", "prompt_id", "prompt", "completion", "label"]


def load(run: Run, name: str | None) -> Scoreset:
    cfg = run.config()
    if name in (None, TRAIN):
        its = run.committed()
        if not its:
            raise ValueError(f"{run.url} has no committed iterations")
        files = [f for i in its for f in run.manifest(i).files]
        # manifests map logical names (iter-000003/scores.parquet) to the attempt-unique files
        pick = lambda suffix: [f.path for f in files if f.logical.endswith(suffix)]  # noqa: E731
        return Scoreset(
            TRAIN,
            scan(run.store, pick("/scores.parquet")),
            scan(run.store, pick("/rewards.parquet")),
            scan(run.store, pick("/rollouts.parquet")).select(ROLLOUT_COLUMNS),
            {e.name: e.weight for e in cfg.evaluators},
            {q.id: q.weight for q in cfg.questions},
            {q.id: q.text for q in cfg.questions},
            cfg.scoring.reward_form,
            cfg.scoring.logp_floor,
        )
    ss = scoreset.unit(run, name)
    if not ss.committed():
        raise ValueError(f"score set {name!r} is not committed in {run.url}")
    m = ss.manifest()
    pick = lambda suffix: [f.path for f in m.files if f.logical.endswith(suffix)]  # noqa: E731
    return Scoreset(
        name,
        scan(run.store, pick("/scores.parquet")),
        scan(run.store, pick("/rewards.parquet")),
        scan(run.store, [run.path(i, ROLLOUTS_FILE) for i in m.iterations]).select(ROLLOUT_COLUMNS),
        {e["name"]: e["weight"] for e in m.evaluators},
        {q["id"]: q["weight"] for q in m.questions},
        {q["id"]: q["text"] for q in m.questions},
        m.scoring["reward_form"],
        m.scoring["logp_floor"],
    )
