"""One run's directory: its layout, its stage records and the commit protocol.

    {root}/{run_id}/run.json                              config snapshot, code version, created_at
    {root}/{run_id}/lease/00000007.json                   who is training this run (see lease.py)
    {root}/{run_id}/iter-000003/rollouts.3f9a2c1b.parquet data files under attempt-unique names
    {root}/{run_id}/iter-000003/checkpoint.5d0e71aa/      an ordinary HF directory (+ optimizer, rng, state)
    {root}/{run_id}/iter-000003/stages/*.json             one record per finished stage (files + hashes)
    {root}/{run_id}/iter-000003/MANIFEST.json             the commit: created last, exclusively

Every data file is written once under a fresh name and never overwritten, so a killed or stale writer
(a process whose lease expired) can only leave unreferenced files behind, never change a file that a
record or manifest lists. Records and manifests map logical names (iter-000003/rollouts.parquet) to
those files; readers ask `Run.path` for a logical name. A stage is done when its record exists and every
file it lists has the recorded hash; a resumed run skips exactly those. An iteration is committed when
its MANIFEST.json exists; readers trust nothing else. `rlme gc` removes the unreferenced files.
"""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel, Field

from rlme_pipeline.config import Config, check_run_id, validate_config
from rlme_pipeline.crash import crash_point
from rlme_pipeline.storage import FileEntry, Store

STAGES = ("generate", "score", "aggregate", "update")
MANIFEST = "MANIFEST.json"


class RunMismatch(ValueError):
    pass


class CorruptRun(RuntimeError):
    """Committed data that does not check out: resuming on top of it would hide the damage."""


class StageRecord(BaseModel):
    stage: str
    iteration: int
    files: list[FileEntry]
    seconds: float
    metrics: dict = Field(default_factory=dict)
    info: dict = Field(default_factory=dict)  # lineage: model versions, seeds, counts


class Manifest(BaseModel):
    run_id: str
    iteration: int
    committed_at: str
    files: list[FileEntry]
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


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@cache
def code_version() -> dict:
    try:
        pkg = version("rlme")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
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
        root, _, run_id = url.rstrip("/").rpartition("/")
        if not root or not run_id or run_id.endswith(":"):
            raise ValueError(f"{url!r} is not a run URL: expected {{storage}}/{{run_id}}, e.g. ./runs/demo")
        return cls(Store(root, storage_options), run_id)

    @classmethod
    def for_config(cls, cfg: Config) -> Run:
        return cls(Store(cfg.run.storage, cfg.run.storage_options), cfg.run.id)

    @property
    def url(self) -> str:
        return self.store.url

    # --- run.json --------------------------------------------------------------------------------
    def open(self, cfg: Config) -> None:
        """Create run.json, or check that the stored run computes the same thing as `cfg`."""
        if self.store.exists("run.json"):
            meta = self.store.read_json("run.json")
            if meta["config_hash"] != cfg.hash():
                raise RunMismatch(
                    f"run {self.url} was created with a different configuration (hash {meta['config_hash'][:12]} "
                    f"vs {cfg.hash()[:12]}); only settings outside the hash (run.iterations, run.storage, ...; "
                    "docs/config.md) may change on resume. Use a new run id (run.id or --run-id) for a new experiment."
                )
            return
        self.store.write_json(
            "run.json",
            {"run_id": self.id, "config": cfg.model_dump(mode="json"), "config_hash": cfg.hash(), "code": code_version(), "created_at": now()},
        )

    def config(self) -> Config:
        return validate_config(self.store.read_json("run.json")["config"], f"{self.url}/run.json")

    # --- stage records ---------------------------------------------------------------------------
    def rel(self, i: int, name: str) -> str:
        return f"{iter_dir(i)}/{name}"

    def new_path(self, i: int, name: str) -> tuple[str, str]:
        """(logical, attempt-unique physical) relative paths for a file or directory a stage writes now."""
        logical = self.rel(i, name)
        return logical, attempt_name(logical)

    def files(self, i: int) -> list[FileEntry]:
        """The files of iteration i: the manifest's when committed, else those of its finished stages."""
        if self.store.exists(self.rel(i, MANIFEST)):
            return self.manifest(i).files
        out = []
        for stage in STAGES:
            if self.store.exists(self.rel(i, f"stages/{stage}.json")):
                out += self.read_record(i, stage).files
        return out

    def path(self, i: int, name: str) -> str:
        """Where the bytes of a logical file (e.g. 'rollouts.parquet') of iteration i are."""
        logical = self.rel(i, name)
        for f in self.files(i):
            if f.logical == logical:
                return f.path
        raise FileNotFoundError(f"{self.url}/{logical} is listed by no manifest or stage record; run its stage first")

    def read_table(self, i: int, name: str):
        return self.store.read_parquet(self.path(i, name))

    def scan(self, name: str):
        """A polars LazyFrame over one table (e.g. 'scores.parquet') of every committed iteration: the way
        to query a run, since physical file names are attempt-unique and uncommitted files must not count."""
        from rlme_pipeline.parquet_io import scan

        return scan(self.store, [self.path(i, name) for i in self.committed()])

    def write_table(self, i: int, name: str, df, table: str) -> FileEntry:
        logical, physical = self.new_path(i, name)
        return self.store.write_table(physical, df, table, name=logical)

    def read_record(self, i: int, stage: str) -> StageRecord:
        """A stage record as written, without re-hashing its files (for lineage lookups)."""
        return StageRecord.model_validate(self.store.read_json(self.rel(i, f"stages/{stage}.json")))

    def stage_record(self, i: int, stage: str) -> StageRecord | None:
        """The stage's record if every file it lists is intact; None means: run the stage (again)."""
        rel = self.rel(i, f"stages/{stage}.json")
        if not self.store.exists(rel):
            return None
        try:
            rec = StageRecord.model_validate(self.store.read_json(rel))
        except ValueError:
            return None  # a torn or foreign record is not trusted; the stage reruns and rewrites it
        for f in rec.files:
            if not self.store.exists(f.path) or self.store.sha256(f.path) != f.sha256:
                return None
        return rec

    def write_stage_record(self, rec: StageRecord) -> None:
        self.store.write_json(self.rel(rec.iteration, f"stages/{rec.stage}.json"), rec.model_dump(mode="json"))

    # --- commits ---------------------------------------------------------------------------------
    def iterations(self) -> list[int]:
        """Iterations with a directory (committed or not)."""
        return sorted(int(n.removeprefix("iter-")) for n in self.store.ls() if n.startswith("iter-") and n[5:].isdigit())

    def committed(self) -> list[int]:
        return [i for i in self.iterations() if self.store.exists(self.rel(i, MANIFEST))]

    def manifest(self, i: int) -> Manifest:
        rel = self.rel(i, MANIFEST)
        try:
            m = Manifest.model_validate(self.store.read_json(rel))
        except ValueError as e:  # JSONDecodeError and pydantic's ValidationError are both ValueErrors
            first = str(e).strip().splitlines()[0]
            raise CorruptRun(
                f"{self.store.where(rel)} is not a valid manifest ({type(e).__name__}: {first}). The iteration's "
                f"commit is damaged; nothing was changed. Inspect it with `rlme verify {self.url}`; to recompute "
                "the iteration, delete that MANIFEST.json and run `rlme train` again."
            ) from None
        if m.run_id != self.id or m.iteration != i:
            raise CorruptRun(f"{self.store.where(rel)} belongs to run {m.run_id!r} iteration {m.iteration}, not {self.id!r} {i}")
        return m

    def check_files(self, files: list[FileEntry], hash_if=lambda f: True) -> list[str]:
        """Problems with files against their entries (missing, size, sha256 where hash_if(entry));
        empty when all check out."""
        problems = []
        for f in files:
            where = self.store.where(f.path)
            if not self.store.exists(f.path):
                problems.append(f"{where}: missing (listed as {f.logical})")
            elif (size := self.store.size(f.path)) != f.bytes:
                problems.append(f"{where}: {size} bytes, the manifest says {f.bytes} (truncated or replaced)")
            elif hash_if(f) and self.store.sha256(f.path) != f.sha256:
                problems.append(f"{where}: sha256 does not match the manifest (the file was changed after commit)")
        return problems

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
        # Exclusive create: if another writer (a stale lease holder) committed first, its manifest stands;
        # its files are complete and hash-checked, computed from the same inputs.
        if not self.store.create_json(self.rel(i, MANIFEST), m.model_dump(mode="json")):
            return self.manifest(i)
        return m
