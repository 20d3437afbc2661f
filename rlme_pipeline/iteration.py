"""Run the stages of one iteration with stage-level idempotency, without any orchestrator.

Prefect tasks call `run_stage` and `commit`; tests and benchmarks call `train` directly.
"""

from __future__ import annotations

from typing import Callable

from rlme_pipeline.config import Config
from rlme_pipeline.crash import crash_point
from rlme_pipeline.lease import Lease
from rlme_pipeline.run import STAGES, CorruptRun, Manifest, Run, StageRecord
from rlme_pipeline.stages.aggregate import aggregate
from rlme_pipeline.stages.generate import generate
from rlme_pipeline.stages.score import score
from rlme_pipeline.stages.update import update

STAGE_FNS: dict[str, Callable[[Config, Run, int], StageRecord]] = {
    "generate": generate, "score": score, "aggregate": aggregate, "update": update,
}


def run_stage(cfg: Config, run: Run, iteration: int, stage: str) -> tuple[StageRecord, bool]:
    """(record, ran): a stage whose record and files check out is not run again."""
    rec = run.stage_record(iteration, stage)
    if rec is not None:
        return rec, False
    rec = STAGE_FNS[stage](cfg, run, iteration)
    crash_point(f"{stage}:written", iteration)
    run.write_stage_record(rec)  # written after its data files: the record is the stage's commit
    return rec, True


def commit(cfg: Config, run: Run, iteration: int) -> Manifest:
    if iteration in run.committed():
        return run.manifest(iteration)
    return run.commit(iteration, cfg, [run.read_record(iteration, s) for s in STAGES])


def check_resume_point(run: Run) -> list[int]:
    """Committed iterations, after proving that what training continues from is intact: every manifest
    parses, and the newest one's files (the checkpoint the next iteration loads) match their hashes.
    Older iterations are left to `rlme verify`, which re-hashes everything. On object storage the
    checkpoint's files are only size-checked here: their download into the cache verifies each sha256,
    and hashing them here too would fetch a multi-GB checkpoint twice."""
    committed = run.committed()
    for i in committed:
        run.manifest(i)  # raises CorruptRun with the file named
    hash_if = (lambda f: True) if run.store.is_local else (lambda f: "/checkpoint/" not in f.logical)
    if committed and (problems := run.check_files(run.manifest(committed[-1]).files, hash_if)):
        raise CorruptRun(
            f"run {run.url}: committed iteration {committed[-1]} is damaged, refusing to continue on top of it:\n  "
            + "\n  ".join(problems) + f"\nSee `rlme verify {run.url}`."
        )
    return committed


def train(cfg: Config, run: Run, on_commit: Callable[[Manifest], None] | None = None) -> list[Manifest]:
    """Advance the run to cfg.run.iterations committed iterations; returns the manifests made now."""
    with Lease(run.store, purpose="train") as lease:
        run.open(cfg)
        done = set(check_resume_point(run))
        made = []
        for i in range(cfg.run.iterations):
            if i in done:
                continue
            for stage in STAGES:
                lease.check()
                run_stage(cfg, run, i, stage)
            lease.check()
            m = commit(cfg, run, i)
            made.append(m)
            if on_commit:
                on_commit(m)
        return made
