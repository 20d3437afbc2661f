"""One run's directory, its layout, and the write-once commit unit that every piece of it is written by.

    {root}/{run_id}/run.json                              config snapshot, code version, created_at
    {root}/{run_id}/lease/00000007.json                   who is training this run (see lease.py)
    {root}/{run_id}/iter-000003/rollouts.3f9a2c1b.parquet data files under attempt-unique names
    {root}/{run_id}/iter-000003/checkpoint.5d0e71aa/      an ordinary HF directory (+ optimizer, rng, state)
    {root}/{run_id}/iter-000003/stages/*.json             one record per finished stage (files + hashes)
    {root}/{run_id}/iter-000003/MANIFEST.json             the commit: created last, exclusively
    {root}/{run_id}/scoresets/{name}/...                  re-scores, made of the same units (scoreset.py)

A `Unit` is one directory committed as a whole: a training iteration, a score-set shard, a score set.
Every data file is written once under a fresh name and never overwritten, so a killed or stale writer
(a process whose lease expired) can only leave unreferenced files behind, never change a file that a
record or manifest lists. Records and manifests map logical names (iter-000003/rollouts.parquet) to
those files, by paths relative to the run; readers ask `Unit.path` (`Run.path`) for a logical name. A
step is done when its record exists and every file it lists has the recorded hash; a resumed run skips
exactly those. A unit is committed when its MANIFEST.json exists; it is created exclusively, so the
first commit stands, and readers trust nothing else. `rlme verify` re-hashes what manifests list;
`rlme gc` removes the files nothing references.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import secrets
import subprocess
from collections.abc import Callable, Iterable
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Generic, TypeVar

import polars as pl
from pydantic import BaseModel, Field

from rlme_pipeline.config import Config, check_run_id, experiment_diff, validate_config
from rlme_pipeline.steps import RECORDED
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.store import FileEntry, Store

MANIFEST = "MANIFEST.json"
# The logical names of an iteration's (and a score-set shard's) tables; physical names add an attempt token.
ROLLOUTS_FILE, SCORES_FILE, REWARDS_FILE = "rollouts.parquet", "scores.parquet", "rewards.parquet"
EVAL_FILE = "eval.parquet"


class RunMismatch(ValueError):
    pass


class NoRun(ValueError):
    """The URL holds no run."""


class CorruptRun(RuntimeError):
    """Committed data that does not check out: resuming on top of it would hide the damage."""


class StageRecord(BaseModel):
    stage: str
    iteration: int
    files: list[FileEntry]
    seconds: float
    metrics: dict = Field(default_factory=dict)
    info: dict = Field(default_factory=dict)  # lineage: model versions, seeds, counts


class Commit(BaseModel):
    """What every manifest holds: each file it commits, with sha256, bytes and rows."""

    files: list[FileEntry]


class Manifest(Commit):
    """A training iteration's commit."""

    run_id: str
    iteration: int
    committed_at: str
    config_hash: str
    lineage: dict  # policy/evaluator versions, question hashes, template hash, seeds
    code: dict
    timings: dict[str, float]
    metrics: dict


def iter_dir(i: int) -> str:
    return f"iter-{i:06d}"


def attempt_name(logical: str, token: str | None = None) -> str:
    """iter-000003/rollouts.parquet -> iter-000003/rollouts.3f9a2c1b.parquet; a suffix-less name (a
    directory such as iter-000003/checkpoint) gets the token appended."""
    token = token or secrets.token_hex(4)
    head, _, leaf = logical.rpartition("/")
    stem, dot, ext = leaf.partition(".")
    leaf = f"{stem}.{token}{dot}{ext}" if dot else f"{leaf}.{token}"
    return f"{head}/{leaf}" if head else leaf


def split_run_url(url: str) -> tuple[str, str]:
    """`s3://bucket/runs/exp-42` -> (`s3://bucket/runs`, `exp-42`): the one parser of {storage}/{run_id}."""
    root, _, run_id = url.rstrip("/").rpartition("/")
    if not root or not run_id or root.endswith((":", ":/")) or run_id.endswith(":"):
        raise ValueError(
            f"{url!r} is not a run URL: expected {{storage}}/{{run_id}}, e.g. ./runs/demo or s3://bucket/runs/demo"
        )
    return root, check_run_id(run_id)


def check_files(
    store: Store, files: Iterable[FileEntry], hash_if: Callable[[FileEntry], bool] = lambda f: True
) -> list[str]:
    """Problems with files against their entries (missing, size, sha256 where hash_if(entry)); empty when
    all check out."""
    problems = []
    for f in files:
        where = store.where(f.path)
        if not store.exists(f.path):
            problems.append(f"{where}: missing (listed as {f.logical})")
        elif (size := store.size(f.path)) != f.bytes:
            problems.append(f"{where}: {size} bytes, the manifest says {f.bytes} (truncated or replaced)")
        elif hash_if(f) and store.sha256(f.path) != f.sha256:
            problems.append(f"{where}: sha256 does not match the manifest (the file was changed after commit)")
    return problems


M = TypeVar("M", bound=Commit)


class Unit(Generic[M]):
    """One write-once commit unit: a directory of the run store, relative to the run (iter-000003,
    scoresets/v2/_shards/iter-000003/shard-00002, scoresets/v2).

        {dir}/rewards.3f9a2c1b.parquet   data files under attempt-unique names, never overwritten
        {dir}/stages/{step}.json         a record per finished step (only units with steps), after its files
        {dir}/MANIFEST.json              the commit: lists every file; created exclusively, the first stands

    `expect` names manifest fields that must match (run_id, iteration, ...): a manifest copied into the
    wrong directory is damage, not data. `remake` says how to make a damaged unit again (the command), for
    the one line a damaged manifest is reported in."""

    def __init__(
        self,
        store: Store,
        dir: str,
        manifest: type[M],
        steps: tuple[str, ...] = (),
        expect: dict | None = None,
        remake: str = "run the command that made it again",
    ):
        self.store, self.dir, self.model, self.steps, self.expect = store, dir, manifest, steps, expect or {}
        self.remake = remake

    def rel(self, name: str) -> str:
        return f"{self.dir}/{name}"

    # --- writes ----------------------------------------------------------------------------------
    def new_path(self, name: str) -> tuple[str, str]:
        """(logical, attempt-unique physical) run-relative paths for a file or directory written now."""
        logical = self.rel(name)
        return logical, attempt_name(logical)

    def write_table(self, name: str, df, table: str) -> FileEntry:
        logical, physical = self.new_path(name)
        return self.store.write_table(physical, df, table, name=logical)

    def write_stream(self, name: str, frames, table: str) -> FileEntry:
        """A table written frame by frame (parquet_io.write_stream): memory is one frame."""
        from rlme_pipeline.storage.parquet import write_stream

        logical, physical = self.new_path(name)
        return write_stream(self.store, physical, frames, table, name=logical)

    # --- records ---------------------------------------------------------------------------------
    def record_rel(self, step: str) -> str:
        return self.rel(f"stages/{step}.json")

    def read_record(self, step: str) -> StageRecord:
        """A record as written, without re-hashing its files (for lineage lookups)."""
        return StageRecord.model_validate(self.store.read_json(self.record_rel(step)))

    def record(self, step: str) -> StageRecord | None:
        """The step's record if every file it lists is intact; None means: run the step (again)."""
        if not self.store.exists(self.record_rel(step)):
            return None
        try:
            rec = self.read_record(step)
        except ValueError:
            return None  # a torn or foreign record is not trusted; the step reruns and rewrites it
        for f in rec.files:
            if not self.store.exists(f.path) or self.store.sha256(f.path) != f.sha256:
                return None
        return rec

    def write_record(self, step: str, rec: StageRecord) -> None:
        """Written after the files it lists: the step's commit inside the unit."""
        self.store.write_json(self.record_rel(step), rec.model_dump(mode="json"))

    # --- the commit ------------------------------------------------------------------------------
    def committed(self) -> bool:
        return self.store.exists(self.rel(MANIFEST))

    def manifest(self) -> M:
        rel = self.rel(MANIFEST)
        try:
            m = self.model.model_validate(self.store.read_json(rel))
        except ValueError as e:  # JSONDecodeError and pydantic's ValidationError are both ValueErrors
            first = str(e).strip().splitlines()[0]
            raise CorruptRun(
                f"{self.store.where(rel)} is not a valid manifest ({type(e).__name__}: {first}). The commit of "
                f"{self.dir} is damaged; nothing was changed. Inspect it with `rlme verify {self.store.url}`; to "
                f"recompute it, delete that MANIFEST.json and {self.remake}."
            ) from None
        if wrong := {k: getattr(m, k) for k, v in self.expect.items() if getattr(m, k) != v}:
            said = ", ".join(f"{k} {getattr(m, k)!r}" for k in self.expect)
            raise CorruptRun(
                f"{self.store.where(rel)} belongs to {said}, not {', '.join(f'{k} {self.expect[k]!r}' for k in wrong)}"
            )
        return m

    def commit(self, m: M) -> M:
        """Create MANIFEST.json exclusively. If another writer (a stale lease holder, a retried task)
        committed first, its manifest stands and is returned: its files are complete and listed."""
        if not self.store.create_json(self.rel(MANIFEST), m.model_dump(mode="json")):
            return self.manifest()
        return m

    def files(self) -> list[FileEntry]:
        """The unit's files: the manifest's when committed, else those of its finished steps."""
        if self.committed():
            return self.manifest().files
        return [f for s in self.steps if self.store.exists(self.record_rel(s)) for f in self.read_record(s).files]

    def entry(self, name: str) -> FileEntry:
        """The entry of a logical file (e.g. 'rollouts.parquet') of this unit."""
        logical = self.rel(name)
        for f in self.files():
            if f.logical == logical:
                return f
        raise FileNotFoundError(
            f"{self.store.where(logical)} is listed by no manifest or record: not written or not committed yet"
        )

    def path(self, name: str) -> str:
        """Where the bytes of a logical file are."""
        return self.entry(name).path

    def read_table(self, name: str, verify: bool = False):
        """A table by its logical name; with verify, its bytes are checked against the entry first (one read)."""
        entry = self.entry(name)
        if not verify:
            return self.store.read_parquet(entry.path)
        data = self.store.read_bytes(entry.path)
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise CorruptRun(
                f"{self.store.where(entry.path)} does not match its committed entry (sha256, bytes); "
                f"see `rlme verify {self.store.url}`"
            )
        return pl.read_parquet(io.BytesIO(data))

    def referenced(self) -> set[str]:
        """Every run-relative path this unit's manifest and records name (what `rlme gc` keeps)."""
        keep = {self.rel(MANIFEST)} | {self.record_rel(s) for s in self.steps}
        if self.committed():
            keep |= {f.path for f in self.manifest().files}  # CorruptRun propagates: never gc a damaged commit
        for s in self.steps:
            try:
                keep |= {f.path for f in self.read_record(s).files}
            except (FileNotFoundError, ValueError):
                pass
        return keep


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@cache
def code_version() -> dict:
    try:
        pkg = version("rlme")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": "rlme", "version": pkg, "git_commit": commit}


class Run:
    def __init__(self, root: Store, run_id: str):
        self.id = check_run_id(run_id)
        self.root = root
        self.store = root.child(run_id)

    @classmethod
    def from_url(cls, url: str, storage_options: dict | None = None) -> Run:
        root, run_id = split_run_url(url)
        return cls(Store(root, storage_options), run_id)

    @classmethod
    def for_config(cls, cfg: Config) -> Run:
        return cls(Store(cfg.run.storage, cfg.run.storage_options), cfg.run.id)

    @property
    def url(self) -> str:
        return self.store.url

    # --- run.json --------------------------------------------------------------------------------
    def meta(self) -> dict:
        """run.json, checked against the URL: a path without a run, or a run directory copied or renamed
        (its manifests name the run id in run.json, not the directory's), is a user error, said here once."""
        if not self.store.exists("run.json"):
            raise NoRun(
                f"{self.url}: no rlme run here (no run.json). Check the path ({{storage}}/{{run_id}}, e.g. "
                "./runs/demo) and the --storage-option flags, or create the run with `rlme train CONFIG`."
            )
        meta = self.store.read_json("run.json")
        if meta.get("run_id") != self.id:
            raise RunMismatch(
                f"{self.url}/run.json belongs to run {meta.get('run_id')!r}, not {self.id!r}: the run directory was "
                f"copied or renamed, and every manifest in it names {meta.get('run_id')!r}. Rename the directory "
                f"back to {meta.get('run_id')!r} (a copy needs a storage root of its own)."
            )
        return meta

    def check(self, cfg: Config) -> bool:
        """True when the run exists and computes the same thing as `cfg`, False when there is no run yet;
        a different experiment raises, naming each changed field (nothing is written either way)."""
        if not self.store.exists("run.json"):
            return False
        meta = self.meta()
        if meta["config_hash"] != cfg.hash():
            try:
                changed = experiment_diff(self.config(), cfg)
            except ValueError:  # a snapshot this code no longer reads: only the hashes can say it differs
                changed = []
            what = "; ".join(changed) if changed else f"config hash {meta['config_hash'][:12]} -> {cfg.hash()[:12]}"
            raise RunMismatch(
                f"run {self.id} exists with another experiment: {what}; start a new --run-id (run.id) or restore "
                "those values (only run.iterations, run.storage and other non-experiment settings may change; "
                "docs/config.md)"
            )
        return True

    def open(self, cfg: Config) -> None:
        """Create run.json, or check that the stored run computes the same thing as `cfg`."""
        if self.check(cfg):
            return
        self.store.write_json(
            "run.json",
            {
                "run_id": self.id,
                "config": cfg.model_dump(mode="json"),
                "config_hash": cfg.hash(),
                # Where the snapshot's relative data/model paths were resolved from (not hashed): a later
                # `rlme rescore/evolve/audit/export` of the run finds `gguf:../models/x.gguf` from any cwd.
                "config_dir": str(cfg.base_dir.resolve()),
                "code": code_version(),
                "created_at": now(),
            },
        )

    def config(self) -> Config:
        """The run's config; its relative paths resolve against the folder of the config it was created
        from where that folder still exists on this machine (else the current directory, as before)."""
        meta = self.store.read_json("run.json")
        folder = meta.get("config_dir")
        base = folder if folder and Path(folder).is_dir() else None
        return validate_config(meta["config"], f"{self.url}/run.json", base_dir=base)

    # --- iterations: one commit unit each ----------------------------------------------------------
    def unit(self, i: int) -> Unit[Manifest]:
        expect = {"run_id": self.id, "iteration": i}
        return Unit(self.store, iter_dir(i), Manifest, RECORDED, expect, remake="run `rlme train` again")

    def rel(self, i: int, name: str) -> str:
        return self.unit(i).rel(name)

    def new_path(self, i: int, name: str) -> tuple[str, str]:
        """(logical, attempt-unique physical) relative paths for a file or directory a stage writes now."""
        return self.unit(i).new_path(name)

    def files(self, i: int) -> list[FileEntry]:
        """The files of iteration i: the manifest's when committed, else those of its finished stages."""
        return self.unit(i).files()

    def path(self, i: int, name: str) -> str:
        """Where the bytes of a logical file (e.g. 'rollouts.parquet') of iteration i are."""
        return self.unit(i).path(name)

    def read_table(self, i: int, name: str):
        return self.store.read_parquet(self.path(i, name))

    def scan(self, name: str):
        """A polars LazyFrame over one table (e.g. 'scores.parquet') of every committed iteration: the way
        to query a run, since physical file names are attempt-unique and uncommitted files must not count."""
        from rlme_pipeline.storage.parquet import scan

        return scan(self.store, [self.path(i, name) for i in self.committed()])

    def write_table(self, i: int, name: str, df, table: str) -> FileEntry:
        return self.unit(i).write_table(name, df, table)

    def read_record(self, i: int, stage: str) -> StageRecord:
        """A stage record as written, without re-hashing its files (for lineage lookups)."""
        return self.unit(i).read_record(stage)

    def stage_record(self, i: int, stage: str) -> StageRecord | None:
        """The stage's record if every file it lists is intact; None means: run the stage (again)."""
        return self.unit(i).record(stage)

    def write_stage_record(self, rec: StageRecord) -> None:
        self.unit(rec.iteration).write_record(rec.stage, rec)

    def iterations(self) -> list[int]:
        """Iterations with a directory (committed or not)."""
        return sorted(
            int(n.removeprefix("iter-")) for n in self.store.ls() if n.startswith("iter-") and n[5:].isdigit()
        )

    def committed(self) -> list[int]:
        return [i for i in self.iterations() if self.unit(i).committed()]

    def manifest(self, i: int) -> Manifest:
        return self.unit(i).manifest()

    def check_files(self, files: list[FileEntry], hash_if: Callable[[FileEntry], bool] = lambda f: True) -> list[str]:
        return check_files(self.store, files, hash_if)

    def commit(self, i: int, cfg: Config, records: list[StageRecord]) -> Manifest:
        lineage: dict = {"seed": cfg.run.seed, "iteration_seed": [cfg.run.seed, i]}
        for r in records:
            lineage.update(r.info)
        m = Manifest(
            run_id=self.id,
            iteration=i,
            committed_at=now(),
            files=[f for r in records for f in r.files],
            config_hash=cfg.hash(),
            lineage=lineage,
            code=code_version(),
            timings={r.stage: round(r.seconds, 3) for r in records},
            metrics={k: v for r in records for k, v in r.metrics.items()},
        )
        crash_point("commit:before-manifest", i)
        return self.unit(i).commit(m)
