"""One run's directory: its layout, its stage records and the commit protocol.

    {root}/{run_id}/run.json                    config snapshot, code version, created_at
    {root}/{run_id}/iter-000003/stages/*.json   one record per finished stage (files + hashes)
    {root}/{run_id}/iter-000003/MANIFEST.json   the commit: written last, lists every file

A stage is done when its record exists and every file it lists is present with the recorded hash; a
resumed run skips exactly those. An iteration is committed when its MANIFEST.json exists; readers
trust nothing else.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel, Field

from rlme_pipeline.config import Config, validate_config
from rlme_pipeline.storage import FileEntry, Store

STAGES = ("generate", "score", "aggregate", "update")
MANIFEST = "MANIFEST.json"


class RunMismatch(ValueError):
    pass


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
        self.id = run_id
        self.root = root
        self.store = root.child(run_id)

    @classmethod
    def from_url(cls, url: str, storage_options: dict | None = None) -> Run:
        root, _, run_id = url.rstrip("/").rpartition("/")
        if not root or not run_id:
            raise ValueError(f"{url!r} is not a run URL: expected {{storage}}/{{run_id}}, e.g. ./runs/demo")
        return cls(Store(root, storage_options), run_id)

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
                    f"vs {cfg.hash()[:12]}); only run.iterations may change on resume. Start a new run id "
                    "(run.id or --run-id) for a changed experiment."
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
    def committed(self) -> list[int]:
        its = []
        for name in self.store.ls():
            if name.startswith("iter-") and self.store.exists(f"{name}/{MANIFEST}"):
                its.append(int(name.removeprefix("iter-")))
        return sorted(its)

    def manifest(self, i: int) -> Manifest:
        return Manifest.model_validate(self.store.read_json(self.rel(i, MANIFEST)))

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
        self.store.write_json(self.rel(i, MANIFEST), m.model_dump(mode="json"))
        return m
