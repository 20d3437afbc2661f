"""Score sets: a run's stored rollouts judged again with other meta-questions or evaluators.

    {run}/scoresets/{name}/DEFINITION.json                     what is computed; written first, checked on resume
    {run}/scoresets/{name}/_shards/iter-000003/shard-00002.*   scores, rewards, and the shard's record (its commit)
    {run}/scoresets/{name}/iter-000003/{scores,rewards}.parquet merged from the shards at the end
    {run}/scoresets/{name}/MANIFEST.json                       written last; readers trust only what it lists

Nothing outside `scoresets/{name}/` is written. A shard is a fixed set of whole prompt groups (by a
stable hash of prompt_id), so its rewards and group-centred advantages are final on their own, it reads
only its rollouts from the Parquet file batch by batch, and an interrupted re-score resumes at the first
shard without a record. Memory is one shard, however many rollouts the run holds.
"""

from __future__ import annotations

import hashlib
import math
import time
from functools import lru_cache
from pathlib import Path

import polars as pl
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from rlme_pipeline import checkpoint
from rlme_pipeline.backends.select import Backends
from rlme_pipeline.config import LIVE_SELF, RUN_ID, Config, ConfigError, EvaluatorConfig, QuestionConfig, ScoringConfig, sha256_json
from rlme_pipeline.judging import evaluators_at, score_rollouts
from rlme_pipeline.lineage import evaluator_at
from rlme_pipeline.parquet_io import iter_batches, write_stream
from rlme_pipeline.rewards import compute_rewards
from rlme_pipeline.run import MANIFEST, Run, code_version, iter_dir, now
from rlme_pipeline.schemas import OK

DEFINITION = "DEFINITION.json"
ROLLOUT_COLUMNS = ["rollout_id", "iteration", "prompt_id", "prompt", "completion"]
TRAIN = "train"  # the scoreset name of the training scores; not available for a re-score


class ScoresetExists(ValueError):
    pass


class Definition(BaseModel):
    """Everything that decides the score set's numbers. Its hash is what `--resume` must match."""

    name: str
    run_id: str
    questions: list[QuestionConfig]
    evaluators: list[EvaluatorConfig]
    scoring: ScoringConfig  # the run's template and reward form
    scale_advantage_std: bool
    iterations: list[int]
    sources: dict[str, dict]  # iteration -> rollouts entry and the committed manifest's sha256
    evaluator_versions: dict[str, dict[str, str]]  # iteration -> evaluator -> weights hash
    n_shards: dict[str, int]
    shard_rows: int

    def hash(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


# --- inputs --------------------------------------------------------------------------------------
def _load_list(path: str | Path, what: str) -> list:
    try:
        if "://" in str(path) and not str(path).startswith("file://"):  # s3://... from a deployment's parameters
            import fsspec

            with fsspec.open(str(path), "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = Path(str(path).removeprefix("file://")).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{what} file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if isinstance(data, dict) and what in data:  # also accept a config-shaped file {questions: [...]}
        data = data[what]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty YAML list of {what}")
    return data


def _validate(items: list, model, path, what: str) -> list:
    try:
        out = TypeAdapter(list[model]).validate_python(items)
    except ValidationError as e:
        lines = [f"  {what}[{'.'.join(map(str, err['loc']))}]: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path} is invalid:\n" + "\n".join(lines)) from None
    key = "id" if model is QuestionConfig else "name"
    names = [getattr(x, key) for x in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: duplicate {what} {dup}; each {key} must be unique")
    return out


def load_questions(path: str | Path) -> list[QuestionConfig]:
    return _validate(_load_list(path, "questions"), QuestionConfig, path, "questions")


def load_evaluators(path: str | Path) -> list[EvaluatorConfig]:
    """Relative model paths are relative to the evaluators file, like paths in a config."""
    evs = _validate(_load_list(path, "evaluators"), EvaluatorConfig, path, "evaluators")
    if "://" in str(path) and not str(path).startswith("file://"):
        return evs  # model references in a remote file are used as written
    base = Path(str(path).removeprefix("file://")).resolve().parent
    return [ev.model_copy(update={"model": str((base / ev.model).resolve())}) if (base / ev.model).exists() else ev for ev in evs]


def parse_iterations(spec: str | None, committed: list[int]) -> list[int]:
    """'3:7' is 3..6 (a Python slice: start included, end excluded), '3:' from 3 on, ':2' is 0 and 1, '5' just 5."""
    if not committed:
        raise ValueError("the run has no committed iterations to re-score")
    if spec is None or spec.strip() in ("", ":"):
        return committed
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else max(committed) + 1
        else:
            lo = int(spec)
            hi = lo + 1
    except ValueError:
        raise ValueError(f"--iterations {spec!r}: expected N, A:B, A: or :B (B excluded)") from None
    chosen = [i for i in committed if lo <= i < hi]
    missing = [i for i in range(lo, hi) if i not in committed and i <= max(committed)]
    if missing or not chosen:
        raise ValueError(f"--iterations {spec!r}: iterations {missing or list(range(lo, hi))} are not committed (committed: {committed})")
    return chosen


# --- plan ----------------------------------------------------------------------------------------
def _evaluator_version(run: Run, cfg: Config, ev: EvaluatorConfig, i: int) -> str:
    if ev.model == LIVE_SELF and i > 0:  # the checkpoint's recorded hash: no download needed to know it
        return checkpoint.weights_entry(run.read_record(i - 1, "update").files).sha256
    return evaluator_at(run, cfg, ev, i).version


def _shard_count(rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(rows / shard_rows))


def plan(
    run: Run, name: str, *, questions: list[QuestionConfig] | None = None, evaluators: list[EvaluatorConfig] | None = None,
    iterations: str | None = None, shard_rows: int = 256, resume: bool = False,
) -> Definition:
    """Check the inputs, pin the sources, and write DEFINITION.json (or check it, on resume)."""
    if not RUN_ID.match(name) or ".." in name or name == TRAIN:
        raise ValueError(f"score set name {name!r}: use letters, digits, '.', '_' and '-' (and not {TRAIN!r})")
    if questions is None and evaluators is None:
        raise ValueError("give new questions, new evaluators, or both: otherwise the score set would repeat training's")
    cfg = run.config()
    questions = questions or list(cfg.questions)
    evaluators = evaluators or list(cfg.evaluators)
    its = parse_iterations(iterations, run.committed())
    sources, versions, n_shards = {}, {}, {}
    for i in its:
        m_rel = run.rel(i, MANIFEST)
        entry = next(f for f in run.manifest(i).files if f.logical == run.rel(i, "rollouts.parquet"))
        if run.store.sha256(entry.path) != entry.sha256:
            raise ValueError(f"{run.url}/{entry.path} does not match its committed manifest; the run is damaged")
        sources[str(i)] = {"rollouts": entry.model_dump(mode="json"), "manifest_sha256": run.store.sha256(m_rel)}
        versions[str(i)] = {ev.name: _evaluator_version(run, cfg, ev, i) for ev in evaluators}
        n_shards[str(i)] = _shard_count(entry.rows or 0, shard_rows)
    defn = Definition(
        name=name, run_id=run.id, questions=questions, evaluators=evaluators, scoring=cfg.scoring,
        scale_advantage_std=cfg.algorithm.scale_advantage_std, iterations=its, sources=sources,
        evaluator_versions=versions, n_shards=n_shards, shard_rows=shard_rows,
    )
    store = scoreset_store(run, name)
    if store.exists(DEFINITION):
        stored = store.read_json(DEFINITION)
        if not resume:
            state = "complete" if store.exists(MANIFEST) else "interrupted"
            raise ScoresetExists(
                f"score set {name!r} already exists in {run.url} ({state}); choose another --name"
                + ("" if state == "complete" else ", or pass --resume to continue it with the same definition")
            )
        if stored["hash"] != defn.hash():
            raise ScoresetExists(
                f"score set {name!r} was started with a different definition (questions, evaluators, iterations "
                "or sources differ); --resume continues only the same re-score. Choose another --name."
            )
        return defn
    store.write_json(DEFINITION, {"hash": defn.hash(), "created_at": now(), "definition": defn.model_dump(mode="json")})
    return defn


def scoreset_store(run: Run, name: str):
    return run.store.child(f"scoresets/{name}")


def load_definition(run: Run, name: str) -> Definition:
    return Definition.model_validate(scoreset_store(run, name).read_json(DEFINITION)["definition"])


def shards(defn: Definition) -> list[tuple[int, int]]:
    return [(i, s) for i in defn.iterations for s in range(defn.n_shards[str(i)])]


# --- shards --------------------------------------------------------------------------------------
@lru_cache(maxsize=1 << 16)
def shard_of(prompt_id: str, n: int) -> int:
    """Stable across processes and versions (unlike polars' hash): a resumed shard holds the same rows."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % n


def _shard_rel(i: int, s: int, what: str) -> str:
    return f"_shards/{iter_dir(i)}/shard-{s:05d}.{what}"


def read_shard(run: Run, defn: Definition, i: int, s: int, batch_rows: int = 4096) -> pl.DataFrame:
    """The shard's rollouts (text columns only), read batch by batch: never the whole file at once."""
    n = defn.n_shards[str(i)]
    parts = [
        b.filter(pl.Series([shard_of(p, n) == s for p in b["prompt_id"]], dtype=pl.Boolean))
        for b in iter_batches(run.store, defn.sources[str(i)]["rollouts"]["path"], ROLLOUT_COLUMNS, batch_rows)
    ]
    return pl.concat(parts) if parts else pl.DataFrame(schema={c: pl.String for c in ROLLOUT_COLUMNS})


def _shard_done(store, i: int, s: int) -> dict | None:
    rel = _shard_rel(i, s, "json")
    if not store.exists(rel):
        return None
    rec = store.read_json(rel)
    for f in rec["files"]:
        if not store.exists(f["path"]) or store.sha256(f["path"]) != f["sha256"]:
            return None  # a torn shard is scored again, and its files overwritten (never appended)
    return rec


def score_shard(run: Run, name: str, i: int, s: int, backends: Backends) -> dict:
    """Score one shard and commit it (data files, then its record); a committed shard is skipped."""
    defn = load_definition(run, name)
    store = scoreset_store(run, name)
    if store.exists(MANIFEST):  # the score set is complete; its shards were merged and removed
        return {"iteration": i, "shard": s, "ran": False}
    if (rec := _shard_done(store, i, s)) is not None:
        return {**rec, "ran": False}
    t0 = time.perf_counter()
    cfg = run.config()
    rollouts = read_shard(run, defn, i, s)
    judges = evaluators_at(run, cfg, i, defn.evaluators)
    for j in judges:
        if j.ref.version != defn.evaluator_versions[str(i)][j.name]:
            raise ValueError(f"evaluator {j.name!r} at iteration {i} has changed since the score set was planned")
    if rollouts.height:
        scores = score_rollouts(rollouts, judges, defn.questions, defn.scoring, name, backends)
    else:
        scores = pl.DataFrame()
    rewards = compute_rewards(
        scores if scores.height else _empty("scores"), rollouts.with_columns(pl.col("iteration").cast(pl.Int32)),
        {e.name: e.weight for e in defn.evaluators}, {q.id: q.weight for q in defn.questions},
        form=defn.scoring.reward_form, floor=defn.scoring.logp_floor, scale_std=defn.scale_advantage_std,
    )
    files = [
        store.write_table(_shard_rel(i, s, "scores.parquet"), scores if scores.height else _empty("scores"), "scores"),
        store.write_table(_shard_rel(i, s, "rewards.parquet"), rewards, "rewards"),
    ]
    rec = {"iteration": i, "shard": s, "rollouts": rollouts.height, "files": [f.model_dump(mode="json") for f in files],
           "seconds": round(time.perf_counter() - t0, 3)}
    store.write_json(_shard_rel(i, s, "json"), rec)
    return {**rec, "ran": True}


def _empty(table: str) -> pl.DataFrame:
    from rlme_pipeline.schemas import TABLES

    return pl.DataFrame(schema=TABLES[table])


# --- finalize ------------------------------------------------------------------------------------
def finalize(run: Run, name: str) -> dict:
    """Merge each iteration's shards (one shard in memory at a time), check the counts, write MANIFEST.json."""
    defn = load_definition(run, name)
    store = scoreset_store(run, name)
    if store.exists(MANIFEST):
        return store.read_json(MANIFEST)
    J, K = len(defn.evaluators), len(defn.questions)
    files, metrics = [], {}
    for i in defn.iterations:
        recs = [_shard_done(store, i, s) for s in range(defn.n_shards[str(i)])]
        if missing := [s for s, r in enumerate(recs) if r is None]:
            raise RuntimeError(f"score set {name!r}: iteration {i} shards {missing} are not committed; run the re-score again with --resume")
        expected = defn.sources[str(i)]["rollouts"]["rows"]
        if sum(r["rollouts"] for r in recs) != expected:
            raise RuntimeError(f"score set {name!r}: iteration {i} shards hold {sum(r['rollouts'] for r in recs)} rollouts, the source {expected}")
        acc = {"n": 0, "sum": 0.0, "sumsq": 0.0, "masked": 0, "failed": 0}

        def frames(what: str):
            for s in range(len(recs)):
                df = store.read_parquet(_shard_rel(i, s, f"{what}.parquet"))
                if what == "rewards":
                    ok = df.filter(pl.col("reward").is_not_nan())
                    acc["n"] += ok.height
                    acc["sum"] += float(ok["reward"].sum())
                    acc["sumsq"] += float((ok["reward"] ** 2).sum())
                    acc["masked"] += df.height - ok.height
                else:
                    acc["failed"] += int((df["status"] != OK).sum())
                yield df

        d = iter_dir(i)
        sc = write_stream(store, f"{d}/scores.parquet", frames("scores"), "scores")
        rw = write_stream(store, f"{d}/rewards.parquet", frames("rewards"), "rewards")
        if sc.rows != expected * J * K or rw.rows != expected:
            raise RuntimeError(f"score set {name!r}: iteration {i} has {sc.rows} scores and {rw.rows} rewards, expected {expected * J * K} and {expected}")
        files += [sc, rw]
        mean = acc["sum"] / acc["n"] if acc["n"] else None
        metrics[str(i)] = {
            "reward_mean": mean,
            "reward_std": math.sqrt(max(acc["sumsq"] / acc["n"] - mean**2, 0.0)) if acc["n"] else None,
            "masked_rollouts": acc["masked"], "failed_share": acc["failed"] / sc.rows if sc.rows else 0.0,
        }
    manifest = {
        "name": name, "run_id": run.id, "committed_at": now(), "definition_hash": defn.hash(),
        "questions": [{**q.model_dump(mode="json"), "sha": q.sha()} for q in defn.questions],
        "evaluators": [{"name": ev.name, "ref": ev.model, "weight": ev.weight, "dtype": ev.dtype,
                        "versions": {it: v[ev.name] for it, v in defn.evaluator_versions.items()}} for ev in defn.evaluators],
        "scoring": {"template_sha": defn.scoring.template_sha(), "reward_form": defn.scoring.reward_form, "logp_floor": defn.scoring.logp_floor},
        "sources": {it: {"rollouts_sha256": src["rollouts"]["sha256"], "manifest_sha256": src["manifest_sha256"]} for it, src in defn.sources.items()},
        "iterations": defn.iterations,
        "files": [f.model_dump(mode="json") for f in files],
        "metrics": metrics, "code": code_version(),
    }
    store.write_json(MANIFEST, manifest)
    store.rm("_shards", recursive=True)  # committed: the merged files replace them
    return manifest


def rescore(run: Run, name: str, **plan_args) -> dict:
    """The whole re-score in one process, shard after shard (the Prefect flow runs shards in parallel)."""
    defn = plan(run, name, **plan_args)
    with Backends(run.config().vllm_settings()) as backends:
        for i, s in shards(defn):
            score_shard(run, name, i, s, backends)
    return finalize(run, name)


def committed_scoresets(run: Run) -> list[str]:
    return [n for n in run.store.ls("scoresets") if run.store.exists(f"scoresets/{n}/{MANIFEST}")]

