"""What the evaluators say about rollouts.

Every rollout x evaluator x meta-question is read off the evaluator's next-token distribution: P(yes)
and P(no) after the judge template, summed over each answer's single-token variants. Used alike by the
score stage, re-scoring (scoreset.py), the audit, the judge-hacking probe (probe.py) and preflight
(answer ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from rlme_pipeline.backends import Judgement
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config, ConfigError, EvaluatorConfig, QuestionConfig, ScoringConfig
from rlme_pipeline.models.weights_at import ModelRef, evaluator_at
from rlme_pipeline.progress import bar
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.schemas import OK
from rlme_pipeline.storage.schemas import SCORES as SCORES_SCHEMA


@dataclass(frozen=True)
class Evaluator:
    """An evaluator as it judges at one iteration: its configured name and the weights it reads with."""

    name: str
    ref: ModelRef


def evaluators_at(
    run: Run, cfg: Config, iteration: int, evaluators: list[EvaluatorConfig] | None = None
) -> list[Evaluator]:
    """The evaluators (the config's, or those given) as they judge iteration i of the run."""
    return [
        Evaluator(ev.name, evaluator_at(run, cfg, ev, iteration))
        for ev in (cfg.evaluators if evaluators is None else evaluators)
    ]


def answer_ids(tokenizer, answers: list[str], where: str) -> list[int]:
    """Distinct token ids of the answer variants; each must be exactly one token for this tokenizer."""
    ids = []
    for a in answers:
        toks = tokenizer(a, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"{where}: answer {a!r} tokenizes to nothing; give a visible answer such as ' Yes'")
        if len(toks) > 1:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise ConfigError(
                f"{where}: answer {a!r} is {len(toks)} tokens {pieces} for this evaluator's tokenizer; "
                "use variants that are single tokens (e.g. ' Yes' and 'Yes')"
            )
        ids.append(toks[0])
    return sorted(set(ids))


def score_rollouts(
    rollouts: pl.DataFrame,
    evaluators: list[Evaluator],
    questions: list[QuestionConfig],
    sc: ScoringConfig,
    scoreset: str,
    backends: Backends,
    label: str = "score",
) -> pl.DataFrame:
    """Rollouts in, one scores row per rollout x evaluator x question out, on `sc.backend`; the
    evaluators are opened one after another (one in memory at a time when not pooled). `label` says
    what is scored on the progress bar ("score", "probe", "eval", "rescore v2 shard 3")."""
    rows = []
    texts = rollouts.select("rollout_id", "iteration", "prompt", "completion").to_dicts()
    for ev in evaluators:
        with backends.judge(ev.ref, sc.backend) as (backend, tok):
            rows += _score_one(texts, ev, backend, tok, questions, sc, scoreset, label)
    return pl.DataFrame(rows) if rows else pl.DataFrame(schema=SCORES_SCHEMA)  # no judges: plain RLVR


def _score_one(
    texts, judge: Evaluator, backend, tok, questions, sc: ScoringConfig, scoreset: str, label: str
) -> list[dict]:
    rows = []
    q_ids = [
        tok(sc.question_template.format(question=q.text), add_special_tokens=False)["input_ids"] for q in questions
    ]
    yes = [answer_ids(tok, q.positive, f"questions[{q.id}].positive") for q in questions]
    no = [answer_ids(tok, q.negative, f"questions[{q.id}].negative") for q in questions]
    prefixes = [tok(sc.template.format(prompt=r["prompt"], completion=r["completion"]))["input_ids"] for r in texts]
    order = sorted(range(len(texts)), key=lambda i: len(prefixes[i]))
    # Questions with the same answer sets are judged in one pass (the usual case: all of them).
    groups: dict[tuple, list[int]] = {}
    for k in range(len(questions)):
        groups.setdefault((tuple(yes[k]), tuple(no[k])), []).append(k)
    its = sorted({r["iteration"] for r in texts})
    where = f" iter {its[0]}" if len(its) == 1 else ""
    with bar(f"{label}{where}: judge {judge.name}", len(order)) as advance:
        for b in range(0, len(order), sc.batch_size):
            idx = order[b : b + sc.batch_size]
            batch = [prefixes[i] for i in idx]
            for (y, n), ks in groups.items():
                res = backend.judge(batch, [q_ids[k] for k in ks], list(y), list(n))
                for j, i in enumerate(idx):
                    for kk, k in enumerate(ks):
                        rows.append(_row(texts[i], judge, questions[k], res[j][kk], scoreset))
            advance(len(idx))
            crash_point("score:mid", texts[idx[0]]["iteration"])
    return rows


def _row(r: dict, judge: Evaluator, q: QuestionConfig, j: Judgement, scoreset: str) -> dict:
    ok = j.status == OK
    return {
        "rollout_id": r["rollout_id"],
        "iteration": r["iteration"],
        "scoreset": scoreset,
        "evaluator": judge.name,
        "question_id": q.id,
        "logp_yes": j.logp_yes if ok else None,
        "logp_no": j.logp_no if ok else None,
        # normalised over the yes/no mass, computed stably: sigmoid(logp_yes - logp_no)
        "p_yes": 1.0 / (1.0 + math.exp(j.logp_no - j.logp_yes)) if ok else None,
        "status": j.status,
        "evaluator_version": judge.ref.version,
        "question_sha": q.sha(),
    }
