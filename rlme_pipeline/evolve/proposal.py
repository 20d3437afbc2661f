"""A proposal: evidence, candidate question sets, their scores and the chosen set, as one commit unit.

    {run}/proposals/{name}/evidence.3f9a2c1b.json     what the proposer was shown (evidence.py)
    {run}/proposals/{name}/prompt.5d0e71aa.txt        the prompt, for a model proposer
    {run}/proposals/{name}/candidates.7b1c90de.json   every draft: raw text, and its edits and questions or
                                                      the reason it was rejected
    {run}/proposals/{name}/stages/prepare.json        the record of the three files above (a rerun reuses them)
    {run}/proposals/{name}/stages/measure-*.json      each candidate's measures (rank.py), `current` included
    {run}/proposals/{name}/scores.0c4e2a19.json       the measures, eligibility and the choice, with the criteria
    {run}/proposals/{name}/chosen.a81f3d02.yaml       the chosen question set (only when one won)
    {run}/proposals/{name}/MANIFEST.json              the commit, created exclusively: the first stands
    {run}/scoresets/evolve-{name}-{k}/                candidate k's re-score (scoreset.py), one per accepted draft,
                                                      with each question's paraphrase at weight 0 (paraphrase.py);
                                                      evolve-{name}-current when the chosen iterations were
                                                      trained with other questions than the run's now (phases.py)

Nothing else of the run is written. Steps: `prepare` (evidence, proposer, parse), `measure` per set
(re-score through the re-score job, probe with the set's questions), `finish` (rank, commit); the evolve
job (jobs/evolve.py) runs them in that order.
A rerun of an interrupted proposal reuses the recorded drafts and continues the candidates' score sets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext

import polars as pl
import yaml

from rlme_pipeline import scoreset
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import RUN_ID, ProposerConfig, QuestionConfig
from rlme_pipeline.evolve import edits, evidence, paraphrase, propose, rank
from rlme_pipeline.judging.judges import evaluators_at, score_rollouts
from rlme_pipeline.judging.probe import probe_rollouts, run_probe, sample_prompts
from rlme_pipeline.storage import phases
from rlme_pipeline.storage.run import ROLLOUTS_FILE, SCORES_FILE, Commit, Run, StageRecord, Unit, code_version, now
from rlme_pipeline.storage.store import FileEntry

CURRENT = "current"
# The re-score job (jobs/rescore.py) as measure calls it: rescore(run, name, questions=, iterations=, resume=).
Rescore = Callable[..., dict]


class ProposalExists(ValueError):
    pass


class ProposalManifest(Commit):
    name: str
    run_id: str
    committed_at: str
    proposer: dict
    criteria: dict
    iterations: list[int]
    current: dict  # the run's questions and their measures
    candidates: list[dict]  # index, source, status, reason, scoreset, measures, ineligible
    chosen: int | None
    why: str
    code: dict


def unit(run: Run, name: str) -> Unit[ProposalManifest]:
    return Unit(
        run.store,
        f"proposals/{name}",
        ProposalManifest,
        steps=("prepare",),
        expect={"name": name, "run_id": run.id},
        remake=f"run `rlme evolve {run.url} --name {name}` again",
    )


def names(run: Run) -> list[str]:
    return run.store.ls("proposals")


def scoreset_name(name: str, k: int) -> str:
    return f"evolve-{name}-{k}"


def check_new(run: Run, name: str) -> None:
    """The name is usable and not committed yet (an uncommitted one is continued)."""
    if not RUN_ID.match(name) or ".." in name or len(scoreset_name(name, 99)) > 128:
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' and '-', at most 110 characters")
    if unit(run, name).committed():
        raise ProposalExists(
            f"--name {name!r}: proposal already committed in {run.url}/proposals; choose another --name"
        )


# --- prepare: evidence, drafts, candidates --------------------------------------------------------
def _write(u: Unit, logical: str, data: bytes) -> FileEntry:
    rel, physical = u.new_path(logical)
    return u.store.write_bytes(physical, data, name=rel)


def _json(obj) -> bytes:
    return json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")


def probe_prompts(run: Run, last: int, n: int) -> pl.DataFrame:
    return sample_prompts(run.read_table(last, ROLLOUTS_FILE).select("prompt_id", "prompt"), n)


def prepare(
    run: Run,
    name: str,
    spec: ProposerConfig,
    n: int,
    iterations: str | None = None,
    probe_n: int = 4,
    backends: Backends | None = None,
) -> dict:
    """Collect the evidence, ask the proposer, parse every draft; recorded, so a rerun asks nobody again."""
    check_new(run, name)
    u = unit(run, name)
    if rec := u.record("prepare"):
        return rec.info
    t0 = time.perf_counter()
    cfg = run.config()
    its = scoreset.parse_iterations(iterations, run.committed())
    current = list(phases.read(run, cfg.questions).latest.questions)  # what the run trains with now
    with Backends(cfg.vllm_settings()) if backends is None else nullcontext(backends) as b:
        probe = run_probe(
            evaluators_at(run, cfg, its[-1]),
            current,
            cfg.scoring,
            probe_prompts(run, its[-1], probe_n),
            its[-1],
            b,
        )
    ev = evidence.collect(run, its, probe)
    drafts, prompt = propose.propose(spec, ev, current, n, cfg.vllm_settings())
    candidates = []
    for k, d in enumerate(drafts):
        c = {"index": k, "source": d.source, "raw": d.text}
        parsed = edits.Rejected(d.error) if d.error else edits.parse(d.text, current)
        if isinstance(parsed, edits.Rejected):
            c |= {"status": "rejected", "reason": parsed.reason}
        else:
            q = [x.model_dump(mode="json") for x in parsed.questions]
            para = paraphrase.paraphrases(parsed.questions, parsed.paraphrases, propose.library())
            c |= {"status": "accepted", "edits": parsed.edits, "questions": q, "paraphrases": para}
            c["scoreset"] = scoreset_name(name, k)
        candidates.append(c)
    files = [_write(u, "evidence.json", _json(ev)), _write(u, "candidates.json", _json(candidates))]
    if prompt is not None:
        files.append(_write(u, "prompt.txt", prompt.encode("utf-8")))
    info = {
        "iterations": its,
        "spec": iterations,
        "probe_prompts": probe_n,
        "proposer": spec.model_dump(),
        "accepted": [c["index"] for c in candidates if c["status"] == "accepted"],
        "drafts": len(candidates),
        "current": [q.model_dump(mode="json") for q in current],
    }
    u.write_record(
        "prepare",
        StageRecord(stage="prepare", iteration=its[-1], files=files, seconds=time.perf_counter() - t0, info=info),
    )
    return info


def current_questions(run: Run, name: str) -> list[QuestionConfig]:
    """The questions the proposal edits: the run's at prepare time (the latest phase's; phases.py)."""
    info = unit(run, name).read_record("prepare").info
    if "current" not in info:  # proposals made before phases existed: the run's own
        return list(run.config().questions)
    return [QuestionConfig.model_validate(q) for q in info["current"]]


def candidates(run: Run, name: str) -> list[dict]:
    return json.loads(run.store.read_bytes(unit(run, name).path("candidates.json")))


# --- measure: one question set ---------------------------------------------------------------------
def _measure_step(k: int | str) -> str:
    return f"measure-{k}"


def measure(run: Run, name: str, k: int | str, backends: Backends, rescore: Rescore) -> dict:
    """Candidate k (or `current`, the run's questions) measured by rank.measure; candidate k is first
    re-scored into its own score set by `rescore` (the re-score job, jobs/rescore.py, with this process's
    backends). Recorded: a rerun measures only what is missing."""
    u = unit(run, name)
    if rec := u.record(_measure_step(k)):
        return rank.renamed(rec.metrics)
    t0 = time.perf_counter()
    info = u.read_record("prepare").info
    cfg = run.config()
    its = info["iterations"]
    ps = phases.read(run, cfg.questions)
    current = current_questions(run, name)
    trained_with_current = all(ps.at(i).questions_sha == phases.questions_sha(current) for i in its)
    para: list[dict] = []  # training's scores hold no paraphrases: the current set's stability is then unknown
    if k == CURRENT and trained_with_current:  # training's own scores
        questions = current
        scores = pl.concat([run.read_table(i, SCORES_FILE) for i in its], how="vertical_relaxed")
    else:  # a candidate, or the current set over iterations another phase judged: re-scored
        if k == CURRENT:
            c = {"questions": current, "scoreset": scoreset_name(name, k)}
            c["paraphrases"] = paraphrase.paraphrases(current, {}, propose.library())
        else:
            c = candidates(run, name)[k]
        questions = [QuestionConfig.model_validate(q) for q in c["questions"]]
        para = c.get("paraphrases", [])  # drafts recorded before paraphrases existed have none
        scored = questions + paraphrase.as_questions(para, questions)  # paraphrases at weight 0
        rescore(run, c["scoreset"], questions=scored, iterations=info["spec"], resume=True)
        scores = pl.concat(
            [scoreset.read_table(run, c["scoreset"], i, SCORES_FILE) for i in its], how="vertical_relaxed"
        )
    rollouts = pl.concat(
        [run.read_table(i, ROLLOUTS_FILE).select(scoreset.ROLLOUT_COLUMNS) for i in its], how="vertical_relaxed"
    )
    probes = probe_rollouts(probe_prompts(run, its[-1], info["probe_prompts"]), its[-1])
    probe_scores = score_rollouts(probes, evaluators_at(run, cfg, its[-1]), questions, cfg.scoring, "probe", backends)
    m = rank.measure(
        questions,
        list(cfg.evaluators),
        cfg.scoring,
        scores,
        rollouts,
        probe_scores,
        probes,
        cfg.answer_format(),
        paraphrase.pairs(para),
    )
    u.write_record(
        _measure_step(k),
        StageRecord(stage=_measure_step(k), iteration=its[-1], files=[], seconds=time.perf_counter() - t0, metrics=m),
    )
    return m


# --- finish: rank and commit ----------------------------------------------------------------------
def finish(run: Run, name: str, criteria: rank.Criteria | None = None) -> ProposalManifest:
    """Rank the measured candidates, write scores.json (and chosen.yaml), commit the proposal."""
    u = unit(run, name)
    if u.committed():
        return u.manifest()
    criteria = criteria or rank.Criteria()
    prep = u.read_record("prepare")
    cs = candidates(run, name)
    base = rank.renamed(u.read_record(_measure_step(CURRENT)).metrics)
    measured = [
        (c["index"], rank.renamed(u.read_record(_measure_step(c["index"])).metrics))
        for c in cs
        if c["status"] == "accepted"
    ]
    chosen, ineligible, why = rank.choose(base, measured, criteria)
    by_k = dict(measured)
    rows = [
        {
            **{k: c.get(k) for k in ("index", "source", "status", "reason", "scoreset", "paraphrases")},
            "measures": by_k.get(c["index"]),
            "ineligible": ineligible.get(c["index"]),
        }
        for c in cs
    ]
    current = {"questions": [q.model_dump(mode="json") for q in current_questions(run, name)], "measures": base}
    scores = {"criteria": criteria.model_dump(), "current": current, "candidates": rows, "chosen": chosen, "why": why}
    files = list(prep.files) + [_write(u, "scores.json", _json(scores))]
    if chosen is not None:
        chosen_yaml = yaml.safe_dump({"questions": cs[chosen]["questions"]}, sort_keys=False, allow_unicode=True)
        files.append(_write(u, "chosen.yaml", chosen_yaml.encode("utf-8")))
    return u.commit(
        ProposalManifest(
            files=files,
            name=name,
            run_id=run.id,
            committed_at=now(),
            proposer=prep.info["proposer"],
            criteria=criteria.model_dump(),
            iterations=prep.info["iterations"],
            current=current,
            candidates=rows,
            chosen=chosen,
            why=why,
            code=code_version(),
        )
    )
