"""score: every rollout x evaluator x meta-question, read off the evaluator's next-token distribution."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import polars as pl

from rlme_pipeline.backends import Judgement, select
from rlme_pipeline.config import Config, ConfigError, QuestionConfig, ScoringConfig, VllmConfig
from rlme_pipeline.crash import crash_point
from rlme_pipeline.lineage import ModelRef, evaluator_at
from rlme_pipeline.progress import bar
from rlme_pipeline.run import Run, StageRecord
from rlme_pipeline.schemas import OK, SCORES as SCORES_SCHEMA

SCORES = "scores.parquet"


@dataclass(frozen=True)
class Judge:
    name: str
    ref: ModelRef


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
    rollouts: pl.DataFrame, judges: list[Judge], questions: list[QuestionConfig], sc: ScoringConfig, scoreset: str,
    vllm: VllmConfig | None = None,
) -> pl.DataFrame:
    """Pure scoring: rollouts in, one scores row per rollout x judge x question out, on `sc.backend`."""
    rows = []
    texts = rollouts.select("rollout_id", "iteration", "prompt", "completion").to_dicts()
    for judge in judges:
        with select.open_judge(vllm or VllmConfig(), judge.ref, sc.backend) as (backend, tok):
            rows += _score_one(texts, judge, backend, tok, questions, sc, scoreset)
    return pl.DataFrame(rows) if rows else pl.DataFrame(schema=SCORES_SCHEMA)  # no judges: plain RLVR


def _score_one(texts, judge: Judge, backend, tok, questions, sc: ScoringConfig, scoreset: str) -> list[dict]:
    rows = []
    q_ids = [tok(sc.question_template.format(question=q.text), add_special_tokens=False)["input_ids"] for q in questions]
    yes = [answer_ids(tok, q.positive, f"questions[{q.id}].positive") for q in questions]
    no = [answer_ids(tok, q.negative, f"questions[{q.id}].negative") for q in questions]
    prefixes = [tok(sc.template.format(prompt=r["prompt"], completion=r["completion"]))["input_ids"] for r in texts]
    order = sorted(range(len(texts)), key=lambda i: len(prefixes[i]))
    # Questions with the same answer sets are judged in one pass (the usual case: all of them).
    groups: dict[tuple, list[int]] = {}
    for k in range(len(questions)):
        groups.setdefault((tuple(yes[k]), tuple(no[k])), []).append(k)
    with bar(f"score {judge.name}", len(order)) as advance:
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


def _row(r: dict, judge: Judge, q: QuestionConfig, j: Judgement, scoreset: str) -> dict:
    ok = j.status == OK
    return {
        "rollout_id": r["rollout_id"], "iteration": r["iteration"], "scoreset": scoreset,
        "evaluator": judge.name, "question_id": q.id,
        "logp_yes": j.logp_yes if ok else None, "logp_no": j.logp_no if ok else None,
        # normalised over the yes/no mass, computed stably: sigmoid(logp_yes - logp_no)
        "p_yes": 1.0 / (1.0 + math.exp(j.logp_no - j.logp_yes)) if ok else None,
        "status": j.status, "evaluator_version": judge.ref.version, "question_sha": q.sha(),
    }


def judges_at(cfg: Config, run: Run, iteration: int) -> list[Judge]:
    return [Judge(ev.name, evaluator_at(run, cfg, ev, iteration)) for ev in cfg.evaluators]


def score(cfg: Config, run: Run, iteration: int) -> StageRecord:
    t0 = time.perf_counter()
    rollouts = run.read_table(iteration, "rollouts.parquet")
    judges = judges_at(cfg, run, iteration)
    starts_before = len(select.START_SECONDS)
    df = score_rollouts(rollouts, judges, cfg.questions, cfg.scoring, scoreset="train", vllm=cfg.vllm_settings())
    entry = run.write_table(iteration, SCORES, df, "scores")
    metrics = {"failed_share": float((df["status"] != OK).mean()) if df.height else 0.0}
    if server_start := select.START_SECONDS[starts_before:]:
        metrics["backend_start_seconds"] = float(sum(server_start))
    if cfg.probe.every and iteration % cfg.probe.every == 0:
        from rlme_pipeline.probe import probe_metrics, run_probe, sample_prompts

        table = run_probe(judges, cfg.questions, cfg.scoring, sample_prompts(rollouts, cfg.probe.prompts, cfg.run.seed), iteration,
                          vllm=cfg.vllm_settings())
        metrics.update(probe_metrics(table, cfg.probe.alarm_share))
    return StageRecord(
        stage="score", iteration=iteration, files=[entry], seconds=time.perf_counter() - t0,
        metrics=metrics,
        info={
            "evaluators": [{"name": j.name, "ref": ev.model, "weight": ev.weight, "version": j.ref.version}
                           for j, ev in zip(judges, cfg.evaluators)],
            "questions": [{"id": q.id, "text": q.text, "weight": q.weight, "sha": q.sha()} for q in cfg.questions],
            "template_sha": cfg.scoring.template_sha(),
        },
    )
