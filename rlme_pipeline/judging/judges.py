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
from rlme_pipeline.config import Config, EvaluatorConfig, QuestionConfig, ScoringConfig
from rlme_pipeline.judging import inputs
from rlme_pipeline.models.weights_at import ModelRef, evaluator_at
from rlme_pipeline.progress import bar
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.schemas import OK
from rlme_pipeline.storage.schemas import SCORES as SCORES_SCHEMA


@dataclass(frozen=True)
class Evaluator:
    """An evaluator as it judges at one iteration: its configured name and the weights it reads with.
    `predates_chat_template`: its run was created before scoring.chat_template existed, so "auto" means
    the raw text that run was always judged on (judging/inputs.py)."""

    name: str
    ref: ModelRef
    predates_chat_template: bool = False


def evaluators_at(
    run: Run, cfg: Config, iteration: int, evaluators: list[EvaluatorConfig] | None = None
) -> list[Evaluator]:
    """The evaluators (the config's, or those given) as they judge iteration i of the run."""
    old = predates_chat_template(run)
    return [
        Evaluator(ev.name, evaluator_at(run, cfg, ev, iteration), old)
        for ev in (cfg.evaluators if evaluators is None else evaluators)
    ]


def evaluators_at_start(cfg: Config) -> list[Evaluator]:
    """The evaluators as they judge iteration 0 of a new run, before one exists (judge-check): the live
    and the frozen self are then both the initial policy, so no run is read (evaluator_at needs none at 0)."""
    return [Evaluator(ev.name, evaluator_at(None, cfg, ev, 0)) for ev in cfg.evaluators]


def predates_chat_template(run: Run) -> bool:
    """Whether the run's config snapshot (run.json) was written before scoring.chat_template existed."""
    if not run.store.exists("run.json"):
        return False
    return "chat_template" not in run.meta()["config"].get("scoring", {})


def answer_ids(tokenizer, answers: list[str], where: str, after: str | None = None) -> list[int]:
    """Distinct token ids of the answer variants, each one token (judging/inputs.py; `after`: chat form)."""
    return inputs.answer_ids(tokenizer, answers, where, after)


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


def judge_answer_ids(tok, q: QuestionConfig, sc: ScoringConfig, chat: bool, evaluator: str = "") -> tuple:
    """(yes ids, no ids) of a question as this evaluator reads them: in chat form, the tokens a reply
    starts with after the assistant header; preflight checks them with this same function."""
    after = inputs.question_tail(tok, sc, q.text) if chat else None
    who = f" (evaluator {evaluator})" if evaluator else ""
    return (
        answer_ids(tok, q.positive, f"questions[{q.id}].positive{who}", after),
        answer_ids(tok, q.negative, f"questions[{q.id}].negative{who}", after),
    )


def _score_one(
    texts, judge: Evaluator, backend, tok, questions, sc: ScoringConfig, scoreset: str, label: str
) -> list[dict]:
    rows = []
    chat = inputs.uses_chat(sc, tok, judge.name, judge.predates_chat_template)
    enc = inputs.encode(tok, texts, [q.text for q in questions], sc, chat)
    answers = [judge_answer_ids(tok, q, sc, chat) for q in questions]
    order = sorted(range(len(texts)), key=lambda i: len(enc.prefixes[i]))
    # Questions with the same answer sets are judged in one pass (the usual case: all of them).
    groups: dict[tuple, list[int]] = {}
    for k, (y, n) in enumerate(answers):
        groups.setdefault((tuple(y), tuple(n)), []).append(k)
    its = sorted({r["iteration"] for r in texts})
    where = f" iter {its[0]}" if len(its) == 1 else ""
    with bar(f"{label}{where}: judge {judge.name}", len(order)) as advance:
        for b in range(0, len(order), sc.batch_size):
            idx = order[b : b + sc.batch_size]
            for (y, n), ks in groups.items():
                for same, suffixes in _by_suffixes(idx, enc, ks):
                    res = backend.judge([enc.prefixes[i] for i in same], suffixes, list(y), list(n))
                    for j, i in enumerate(same):
                        for kk, k in enumerate(ks):
                            rows.append(_row(texts[i], judge, questions[k], res[j][kk], scoreset))
            advance(len(idx))
            crash_point("score:mid", texts[idx[0]]["iteration"])
    return rows


def _by_suffixes(idx: list[int], enc: inputs.Encoded, ks: list[int]) -> list[tuple[list[int], list[list[int]]]]:
    """The batch's rollouts grouped by their question suffixes, in batch order: one group, the whole
    batch, unless a chat-form seam gave some rollout other suffix tokens (judging/inputs.py)."""
    out: dict[tuple, tuple[list[int], list[list[int]]]] = {}
    for i in idx:
        suffixes = [enc.suffixes[i][k] for k in ks]
        out.setdefault(tuple(map(tuple, suffixes)), ([], suffixes))[0].append(i)
    return list(out.values())


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
