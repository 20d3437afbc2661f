"""A score set as lazy frames: scores, rewards and the rollouts they judge, plus the weights they used.

'train' (or None) is the training data of the committed iterations; any other name is a committed score
set under scoresets/. Only files listed in a committed manifest are read. Where the questions changed
between iterations (a run's phases, phases.py, or a re-score with the run's own questions of such a
run), `phases` says which questions and weights judged which iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from rlme_pipeline import scoreset
from rlme_pipeline.scoreset import TRAIN
from rlme_pipeline.storage import phases as run_phases
from rlme_pipeline.storage.parquet import scan
from rlme_pipeline.storage.run import ROLLOUTS_FILE, Run


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
    # iteration, phase, question_id, weight, text: one row per iteration x question of its phase, where the
    # questions changed during the run (question_weights/texts are then the last phase's); None otherwise
    phases: pl.DataFrame | None
    answer_format: str  # how labelled rollouts are marked correct: the run's (Config.answer_format)

    def question_ids(self) -> list[str]:
        """Every question asked in any iteration."""
        ids = set(self.question_weights)
        return sorted(ids if self.phases is None else ids | set(self.phases["question_id"]))

    def phase_of(self) -> pl.DataFrame | None:
        """iteration -> phase, where the questions changed."""
        return None if self.phases is None else self.phases.select("iteration", "phase").unique().sort("iteration")


ROLLOUT_COLUMNS = ["rollout_id", "iteration", "prompt_id", "prompt", "completion", "label"]
PHASE_SCHEMA = {"iteration": pl.Int32, "phase": pl.Int64, "question_id": pl.String, "weight": pl.Float64, "text": pl.String}  # fmt: skip


def _phase_table(rows: list[tuple[int, int, list[dict]]]) -> pl.DataFrame:
    """(iteration, phase, questions as dicts) -> the `phases` table."""
    return pl.DataFrame(
        [(i, k, q["id"], float(q["weight"]), q["text"]) for i, k, qs in rows for q in qs],
        schema=PHASE_SCHEMA,
        orient="row",
    )


def load(run: Run, name: str | None) -> Scoreset:
    cfg = run.config()
    if name in (None, TRAIN):
        its = run.committed()
        if not its:
            raise ValueError(f"{run.url} has no committed iterations")
        files = [f for i in its for f in run.manifest(i).files]
        # manifests map logical names (iter-000003/scores.parquet) to the attempt-unique files
        pick = lambda suffix: [f.path for f in files if f.logical.endswith(suffix)]  # noqa: E731
        ps = run_phases.read(run, cfg.questions)
        last = ps.at(its[-1]).questions
        table = None
        if len(ps.all) > 1:
            table = _phase_table([(i, ps.at(i).phase, [q.model_dump() for q in ps.at(i).questions]) for i in its])
        return Scoreset(
            TRAIN,
            scan(run.store, pick("/scores.parquet")),
            scan(run.store, pick("/rewards.parquet")),
            scan(run.store, pick("/rollouts.parquet")).select(ROLLOUT_COLUMNS),
            {e.name: e.weight for e in cfg.evaluators},
            {q.id: q.weight for q in last},
            {q.id: q.text for q in last},
            cfg.scoring.reward_form,
            cfg.scoring.logp_floor,
            table,
            cfg.answer_format(),
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
        _scoreset_phases(run, m.phase_questions),
        cfg.answer_format(),
    )


def _scoreset_phases(run: Run, phase_questions: dict[str, list[dict]] | None) -> pl.DataFrame | None:
    """A re-score with the run's own questions of a run with phases: each iteration's training phase."""
    if not phase_questions:
        return None
    ps = run_phases.read(run)
    return _phase_table([(int(i), ps.at(int(i)).phase, qs) for i, qs in phase_questions.items()])
