"""Score sets: a run's stored rollouts judged again with other meta-questions or evaluators.

    {run}/scoresets/{name}/DEFINITION.json                       what is computed; created first, checked on resume
    {run}/scoresets/{name}/_shards/iter-000003/shard-00002/      one commit unit per shard: scores, rewards, MANIFEST.json
    {run}/scoresets/{name}/iter-000003/scores.3f9a2c1b.parquet   merged from the shards at the end (and rewards.*.parquet)
    {run}/scoresets/{name}/MANIFEST.json                         the score set's commit; readers trust only what it lists

Shards and the score set are `run.Unit`s, like training iterations: data files under attempt-unique
names, an exclusively created MANIFEST.json listing them (the first commit stands), read by logical name
(`read_table(run, name, 3, "scores.parquet")`); `rlme verify` and `rlme gc` cover them. Nothing outside
`scoresets/{name}/` is written. A shard is a fixed set of whole prompt groups (by a stable hash of
prompt_id), so its rewards and group-centred advantages are final on their own; they come from the
training aggregation (stages/aggregate.py), label-reward mix included, so a score set made with the
run's own questions and evaluators reproduces its training rewards. A shard reads only its rollouts from
the Parquet file batch by batch, and an interrupted re-score resumes at the first uncommitted shard.
Memory is one shard, however many rollouts the run holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import time
from functools import lru_cache
from pathlib import Path

import polars as pl
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError, model_validator

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import (
    LIVE_SELF,
    RUN_ID,
    Config,
    ConfigError,
    EvaluatorConfig,
    LabelRewardConfig,
    QuestionConfig,
    ScoringConfig,
    describe_errors,
    sha256_json,
)
from rlme_pipeline.judging.judges import evaluators_at, score_rollouts
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.weights_at import evaluator_at
from rlme_pipeline.stages.aggregate import rewards_and_metrics
from rlme_pipeline.storage import phases, retention
from rlme_pipeline.storage.parquet import iter_batches
from rlme_pipeline.storage.run import (
    MANIFEST,
    REWARDS_FILE,
    ROLLOUTS_FILE,
    SCORES_FILE,
    Commit,
    Run,
    Unit,
    code_version,
    iter_dir,
    now,
)
from rlme_pipeline.storage.schemas import OK, ROLLOUTS, SCORES
from rlme_pipeline.storage.store import Store

DEFINITION = "DEFINITION.json"
ROLLOUT_COLUMNS = ["rollout_id", "iteration", "prompt_id", "prompt", "completion", "label"]
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
    label_reward: LabelRewardConfig | None = None  # the run's label-reward mix, applied as in training
    # iteration -> the questions of its training phase: set when the run's own questions were asked for and
    # the run changed them during training (phases.py); `questions` is then the last iteration's
    phase_questions: dict[str, list[QuestionConfig]] | None = None
    iterations: list[int]
    sources: dict[str, dict]  # iteration -> rollouts entry and the committed manifest's sha256
    evaluator_versions: dict[str, dict[str, str]]  # iteration -> evaluator -> weights hash
    n_shards: dict[str, int]
    shard_rows: int

    def hash(self) -> str:
        d = self.model_dump(mode="json")
        for added_later in ("label_reward", "phase_questions"):  # definitions without them keep their hash
            if d[added_later] is None:
                del d[added_later]
        if d["scoring"]["chat_template"] == "auto":  # added later, default auto: hashed only when set
            del d["scoring"]["chat_template"]
        return sha256_json(d)

    def questions_at(self, i: int) -> list[QuestionConfig]:
        return self.phase_questions[str(i)] if self.phase_questions else self.questions

    def config(self, cfg: Config, i: int) -> Config:
        """The run's config with this score set's judges at iteration i: what the training aggregation reads."""
        return cfg.model_copy(update={"questions": list(self.questions_at(i)), "evaluators": list(self.evaluators)})


class ShardManifest(Commit):
    scoreset: str
    iteration: int
    shard: int
    rollouts: int
    seconds: float
    committed_at: str


class ScoresetManifest(Commit):
    name: str
    run_id: str
    committed_at: str
    definition_hash: str
    questions: list[dict]
    evaluators: list[dict]
    scoring: dict
    sources: dict[str, dict]
    iterations: list[int]
    metrics: dict[str, dict]
    code: dict
    phase_questions: dict[str, list[dict]] | None = None  # Definition.phase_questions, each with its sha

    @model_validator(mode="before")
    @classmethod
    def _run_relative(cls, d):
        """Score sets committed before they were `Unit`s listed paths relative to their own directory."""
        if not isinstance(d, dict) or not all(isinstance(f, dict) for f in d.get("files", [])):
            return d
        prefix = f"scoresets/{d.get('name')}/"

        def fix(f: dict) -> dict:
            if f["path"].startswith(prefix):
                return f
            return {**f, "path": prefix + f["path"], "name": prefix + (f.get("name") or f["path"])}

        return {**d, "files": [fix(f) for f in d["files"]]}


# --- inputs --------------------------------------------------------------------------------------
def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _read_text(path: str, storage_options: dict | None) -> str:
    """A file at a local path or any fsspec URL, read through a Store so the storage options apply."""
    if _is_url(path):
        parent, _, leaf = path.rstrip("/").rpartition("/")
    else:
        local = Path(path.removeprefix("file://")).expanduser().absolute()
        parent, leaf = str(local.parent), local.name
    return Store(parent, storage_options).read_bytes(leaf).decode("utf-8")


def _load_list(path: str, what: str, storage_options: dict | None) -> list:
    fix = f"give a YAML list of {what} (the shape of the config's `{what}`, docs/config.md)"
    try:
        data = yaml.safe_load(_read_text(path, storage_options))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"--{what} {path}: no such file; {fix}") from None
    except PermissionError as e:
        raise ConfigError(f"--{what} {path}: access denied ({e}); check the credentials in the environment") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--{what} {path}: not UTF-8 text; {fix}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--{what} {path}: not valid YAML ({' '.join(str(e).split())}); {fix}") from None
    if isinstance(data, dict) and what in data:  # also accept a config-shaped file {questions: [...]}
        data = data[what]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--{what} {path}: expected a non-empty list; {fix}")
    return data


def _validate(items: list, model, path: str, what: str) -> list:
    try:
        out = TypeAdapter(list[model]).validate_python(items)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, f"--{what} {path}", prefix=f"{what}.")) from None
    key = "id" if model is QuestionConfig else "name"
    names = [getattr(x, key) for x in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--{what} {path}: duplicate {what} {dup}; each {key} must be unique")
    return out


def load_questions(path: str | Path, storage_options: dict | None = None) -> list[QuestionConfig]:
    """Meta-questions from a local path or any fsspec URL; each mistake names the field and the fix."""
    return _validate(_load_list(str(path), "questions", storage_options), QuestionConfig, str(path), "questions")


def load_evaluators(path: str | Path, storage_options: dict | None = None) -> list[EvaluatorConfig]:
    """Relative model paths are relative to the evaluators file, like paths in a config."""
    path = str(path)
    evs = _validate(_load_list(path, "evaluators", storage_options), EvaluatorConfig, path, "evaluators")
    if _is_url(path):
        return evs  # model references in a remote file are used as written
    base = Path(path.removeprefix("file://")).resolve().parent
    return [
        ev.model_copy(update={"model": str((base / ev.model).resolve())}) if (base / ev.model).exists() else ev
        for ev in evs
    ]


def check_new(run: Run, name: str, resume: bool) -> None:
    """The score set's name is usable: well formed, and new unless resuming (what `plan` checks first)."""
    if not RUN_ID.match(name) or ".." in name or name == TRAIN:
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (and not {TRAIN!r})")
    if not resume and scoreset_store(run, name).exists(DEFINITION):
        raise exists_error(run, name)


def exists_error(run: Run, name: str) -> ScoresetExists:
    complete = unit(run, name).committed()
    return ScoresetExists(
        f"--name {name!r}: score set already exists in {run.url} ({'complete' if complete else 'interrupted'}); "
        "choose another --name" + ("" if complete else ", or pass --resume to continue it with the same definition")
    )


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
        raise ValueError(
            f"--iterations {spec!r}: iterations {missing or list(range(lo, hi))} are not committed (committed: {committed})"
        )
    return chosen


# --- plan ----------------------------------------------------------------------------------------
def _evaluator_version(run: Run, cfg: Config, ev: EvaluatorConfig, i: int) -> str:
    if ev.model == LIVE_SELF and i > 0:  # the checkpoint's recorded hash: no download needed to know it
        return checkpoint.weights_entry(run.read_record(i - 1, "update").files).sha256
    return evaluator_at(run, cfg, ev, i).version


def check_checkpoints(run: Run, evaluators: list[EvaluatorConfig], its: list[int]) -> None:
    """A live-self evaluator judges iteration i with iteration i-1's checkpoint, which retention may have
    deleted (retention.py): refuse, naming them, before anything is written or any shard starts."""
    live = [ev.name for ev in evaluators if ev.model == LIVE_SELF]
    gone = {i for i in run.committed() if retention.record(run, i) is not None} if live else set()
    if blocked := [i for i in its if i - 1 in gone]:
        ok = [i for i in run.committed() if i - 1 not in gone]
        raise retention.CheckpointPruned(
            f"--iterations: the live-self evaluator {live} judges iteration i with iteration i-1's checkpoint, and "
            f"the checkpoints of iterations {[i - 1 for i in blocked]} were pruned by the run's retention "
            f"(checkpoint.keep_last / keep_every), so iterations {blocked} cannot be re-scored with it; choose "
            f"--iterations among {ok}, or --evaluators without 'policy' (a run trained with a retention that keeps "
            "those checkpoints, e.g. checkpoint.keep_every, could re-score them)"
        )


def _shard_count(rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(rows / shard_rows))


def plan(
    run: Run,
    name: str,
    *,
    questions: list[QuestionConfig] | None = None,
    evaluators: list[EvaluatorConfig] | None = None,
    iterations: str | None = None,
    shard_rows: int = 256,
    resume: bool = False,
) -> Definition:
    """Check the inputs, pin the sources, and write DEFINITION.json (or check it, on resume)."""
    check_new(run, name, resume=True)  # existence is decided below, by the exclusive create
    if questions is None and evaluators is None:
        raise ValueError("give new questions, new evaluators, or both: otherwise the score set would repeat training's")
    cfg = run.config()
    evaluators = evaluators or list(cfg.evaluators)
    its = parse_iterations(iterations, run.committed())
    check_checkpoints(run, evaluators, its)
    phase_questions = None
    if questions is None:  # the run's own: the questions each iteration was trained with
        ps = phases.read(run, cfg.questions)
        if any(ps.at(i).phase for i in its):
            phase_questions = {str(i): list(ps.at(i).questions) for i in its}
        questions = list(ps.at(its[-1]).questions)
    sources, versions, n_shards = {}, {}, {}
    for i in its:
        entry = run.unit(i).entry(ROLLOUTS_FILE)
        if run.store.sha256(entry.path) != entry.sha256:
            raise ValueError(f"{run.url}/{entry.path} does not match its committed manifest; the run is damaged")
        sources[str(i)] = {
            "rollouts": entry.model_dump(mode="json"),
            "manifest_sha256": run.store.sha256(run.rel(i, MANIFEST)),
        }
        versions[str(i)] = {ev.name: _evaluator_version(run, cfg, ev, i) for ev in evaluators}
        n_shards[str(i)] = _shard_count(entry.rows or 0, shard_rows)
    defn = Definition(
        name=name,
        run_id=run.id,
        questions=questions,
        evaluators=evaluators,
        scoring=cfg.scoring,
        scale_advantage_std=cfg.algorithm.scale_advantage_std,
        label_reward=cfg.label_reward,
        phase_questions=phase_questions,
        iterations=its,
        sources=sources,
        evaluator_versions=versions,
        n_shards=n_shards,
        shard_rows=shard_rows,
    )
    store = scoreset_store(run, name)
    record = {"hash": defn.hash(), "created_at": now(), "definition": defn.model_dump(mode="json")}
    if store.create_json(DEFINITION, record):  # exclusive: of two planners, one defines the score set
        return defn
    if not resume:
        raise exists_error(run, name)
    if store.read_json(DEFINITION)["hash"] != defn.hash():
        raise ScoresetExists(
            f"score set {name!r} was started with a different definition (questions, evaluators, iterations "
            "or sources differ); --resume continues only the same re-score. Choose another --name."
        )
    return defn


def scoreset_dir(name: str) -> str:
    return f"scoresets/{name}"


def scoreset_store(run: Run, name: str):
    return run.store.child(scoreset_dir(name))


def unit(run: Run, name: str) -> Unit[ScoresetManifest]:
    """The score set's commit unit: the merged tables of every iteration, committed at the end."""
    return Unit(run.store, scoreset_dir(name), ScoresetManifest, expect={"name": name, "run_id": run.id})


def shard_unit(run: Run, name: str, i: int, s: int) -> Unit[ShardManifest]:
    return Unit(
        run.store,
        f"{scoreset_dir(name)}/_shards/{iter_dir(i)}/shard-{s:05d}",
        ShardManifest,
        expect={"scoreset": name, "iteration": i, "shard": s},
    )


def shard_units(run: Run, name: str) -> list[Unit[ShardManifest]]:
    """The shards present in storage, committed or not (what verify and gc look at)."""
    base = f"{scoreset_dir(name)}/_shards"
    return [
        shard_unit(run, name, int(d[5:]), int(s[6:]))
        for d in run.store.ls(base)
        if d.startswith("iter-") and d[5:].isdigit()
        for s in run.store.ls(f"{base}/{d}")
        if s.startswith("shard-") and s[6:].isdigit()
    ]


def read_table(run: Run, name: str, i: int, table_file: str) -> pl.DataFrame:
    """A committed score set's table of one iteration ('scores.parquet', 'rewards.parquet')."""
    return unit(run, name).read_table(f"{iter_dir(i)}/{table_file}")


def load_definition(run: Run, name: str) -> Definition:
    return Definition.model_validate(scoreset_store(run, name).read_json(DEFINITION)["definition"])


def shards(defn: Definition) -> list[tuple[int, int]]:
    return [(i, s) for i in defn.iterations for s in range(defn.n_shards[str(i)])]


# --- shards --------------------------------------------------------------------------------------
@lru_cache(maxsize=1 << 16)
def shard_of(prompt_id: str, n: int) -> int:
    """Stable across processes and versions (unlike polars' hash): a resumed shard holds the same rows."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % n


def read_shard(run: Run, defn: Definition, i: int, s: int, batch_rows: int = 4096) -> pl.DataFrame:
    """The shard's rollouts (text columns and label only), read batch by batch: never the whole file at once."""
    n = defn.n_shards[str(i)]
    parts = [
        b.filter(pl.Series([shard_of(p, n) == s for p in b["prompt_id"]], dtype=pl.Boolean))
        for b in iter_batches(run.store, defn.sources[str(i)]["rollouts"]["path"], ROLLOUT_COLUMNS, batch_rows)
    ]
    return pl.concat(parts) if parts else pl.DataFrame(schema={c: ROLLOUTS[c] for c in ROLLOUT_COLUMNS})


def score_shard(run: Run, name: str, i: int, s: int, backends: Backends) -> dict:
    """Score one shard, aggregate it as training does, and commit it; a committed shard is skipped."""
    if unit(run, name).committed():  # the score set is complete; its shards were merged and removed
        return {"iteration": i, "shard": s, "ran": False}
    shard = shard_unit(run, name, i, s)
    if shard.committed():
        return {**shard.manifest().model_dump(mode="json"), "ran": False}
    t0 = time.perf_counter()
    defn = load_definition(run, name)
    cfg = run.config()
    rollouts = read_shard(run, defn, i, s)
    judges = evaluators_at(run, cfg, i, defn.evaluators)
    for j in judges:
        if j.ref.version != defn.evaluator_versions[str(i)][j.name]:
            raise ValueError(f"evaluator {j.name!r} at iteration {i} has changed since the score set was planned")
    if rollouts.height:
        scores = score_rollouts(
            rollouts, judges, defn.questions_at(i), defn.scoring, name, backends, label=f"rescore {name} shard {s}"
        )
    else:
        scores = pl.DataFrame(schema=SCORES)
    rewards, _ = rewards_and_metrics(defn.config(cfg, i), scores, rollouts)
    files = [
        shard.write_table(SCORES_FILE, scores, "scores"),
        shard.write_table(REWARDS_FILE, rewards, "rewards"),
    ]
    m = shard.commit(
        ShardManifest(
            files=files,
            scoreset=name,
            iteration=i,
            shard=s,
            rollouts=rollouts.height,
            seconds=round(time.perf_counter() - t0, 3),
            committed_at=now(),
        )
    )
    return {**m.model_dump(mode="json"), "ran": True}


def score_shards(
    run_uri: str,
    name: str,
    shards: list[tuple[int, int]],
    storage_options: dict | None = None,
    backends: Backends | None = None,
) -> list[dict]:
    """Score these (iteration, shard)s of the score set, each committed on its own. With `backends` the
    shards share that process's models; without, they open their own for the call (a task on another
    process or machine: a Ray worker), loaded once for all of them."""
    run = Run.from_url(run_uri, storage_options)
    with contextlib.nullcontext(backends) if backends is not None else Backends(run.config().vllm_settings()) as b:
        done = [score_shard(run, name, i, s, b) for i, s in shards]
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return [
        {k: d.get(k) for k in ("iteration", "shard", "rollouts", "seconds", "ran")} | {"worker": worker} for d in done
    ]


# --- finalize ------------------------------------------------------------------------------------
def finalize(run: Run, name: str) -> dict:
    """Merge each iteration's committed shards (one shard in memory at a time, each checked against its
    manifest), check the counts, and commit the score set."""
    ss = unit(run, name)
    if ss.committed():
        return ss.manifest().model_dump(mode="json")
    defn = load_definition(run, name)
    J = len(defn.evaluators)
    files, metrics = [], {}
    for i in defn.iterations:
        K = len(defn.questions_at(i))
        shards = [shard_unit(run, name, i, s) for s in range(defn.n_shards[str(i)])]
        if missing := [s for s, u in enumerate(shards) if not u.committed()]:
            raise RuntimeError(
                f"score set {name!r}: iteration {i} shards {missing} are not committed; run the re-score again with --resume"
            )
        expected = defn.sources[str(i)]["rollouts"]["rows"]
        if (held := sum(u.manifest().rollouts for u in shards)) != expected:
            raise RuntimeError(f"score set {name!r}: iteration {i} shards hold {held} rollouts, the source {expected}")
        acc = {"n": 0, "sum": 0.0, "sumsq": 0.0, "masked": 0, "failed": 0}

        def frames(what: str, shards=shards, acc=acc):
            for u in shards:
                df = u.read_table(f"{what}.parquet", verify=True)
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
        sc = ss.write_stream(f"{d}/scores.parquet", frames("scores"), "scores")
        rw = ss.write_stream(f"{d}/rewards.parquet", frames("rewards"), "rewards")
        if sc.rows != expected * J * K or rw.rows != expected:
            raise RuntimeError(
                f"score set {name!r}: iteration {i} has {sc.rows} scores and {rw.rows} rewards, expected {expected * J * K} and {expected}"
            )
        files += [sc, rw]
        mean = acc["sum"] / acc["n"] if acc["n"] else None
        metrics[str(i)] = {
            "reward_mean": mean,
            "reward_std": math.sqrt(max(acc["sumsq"] / acc["n"] - mean**2, 0.0)) if acc["n"] else None,
            "masked_rollouts": acc["masked"],
            "failed_share": acc["failed"] / sc.rows if sc.rows else 0.0,
        }
    lr = defn.label_reward
    m = ss.commit(
        ScoresetManifest(
            name=name,
            run_id=run.id,
            committed_at=now(),
            definition_hash=defn.hash(),
            questions=_with_sha(defn.questions),
            phase_questions={i: _with_sha(qs) for i, qs in defn.phase_questions.items()}
            if defn.phase_questions
            else None,
            evaluators=[
                {
                    "name": ev.name,
                    "ref": ev.model,
                    "weight": ev.weight,
                    "dtype": ev.dtype,
                    "versions": {it: v[ev.name] for it, v in defn.evaluator_versions.items()},
                }
                for ev in defn.evaluators
            ],
            scoring={
                "template_sha": defn.scoring.template_sha(),
                "reward_form": defn.scoring.reward_form,
                "logp_floor": defn.scoring.logp_floor,
                "scale_advantage_std": defn.scale_advantage_std,
                "label_reward": lr.model_dump(mode="json") if lr else None,
            },
            sources={
                it: {"rollouts_sha256": src["rollouts"]["sha256"], "manifest_sha256": src["manifest_sha256"]}
                for it, src in defn.sources.items()
            },
            iterations=defn.iterations,
            files=files,
            metrics=metrics,
            code=code_version(),
        )
    )
    run.store.rm(f"{ss.dir}/_shards", recursive=True)  # committed: the merged files replace them (gc would find them)
    return m.model_dump(mode="json")


def _with_sha(questions: list[QuestionConfig]) -> list[dict]:
    return [{**q.model_dump(mode="json"), "sha": q.sha()} for q in questions]


def names(run: Run) -> list[str]:
    """Every score set directory of the run, committed or not."""
    return run.store.ls("scoresets")


def committed_scoresets(run: Run) -> list[str]:
    return [n for n in names(run) if unit(run, n).committed()]
