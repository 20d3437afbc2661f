"""SIGKILL the trainer at points inside every stage, during the checkpoint upload and between the data
files and the manifest; resume each time; the result must equal an uninterrupted run's, file for file.

One chain of `rlme train` processes on S3 (moto), each running the Prefect flow rlme_train against one
Prefect server, as production does: each process resumes what the previous one left and is killed at the
next point, so every point is hit on a run that has already been interrupted before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlme_pipeline.config import load_config
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage import gc
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.verify import verify

ROOT = Path(__file__).resolve().parents[2]

# (point, iteration): inside generate, score, update and the held-out eval, after aggregate's and eval's
# data files (before their stage records), between two checkpoint files, and after every stage record but
# before MANIFEST.json.
CRASHES = [
    "generate:mid@0",
    "score:mid@0",
    "aggregate:written@0",
    "update:mid@0",
    "eval:mid@0",
    "upload:mid@1",
    "eval:written@1",
    "commit:before-manifest@1",
]


def _with_eval(config: Path) -> Path:
    """The held-out eval on, every iteration: it is committed with its iteration, so it must resume too."""
    d = yaml.safe_load(config.read_text())
    d["eval"] = {"every": 1, "path": str(ROOT / "data" / "demo_heldout.jsonl"), "prompts": 2}
    config.write_text(yaml.safe_dump(d))
    return config


def _train_process(config: Path, crash_at: str | None, api_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api_url}
    env.pop("RLME_CRASH_AT", None)
    if crash_at:
        env["RLME_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "rlme_flows.cli", "train", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _contents(run: Run) -> dict[str, str]:
    """logical name -> sha256 of every committed file."""
    return {f.logical: f.sha256 for i in run.committed() for f in run.manifest(i).files}


def _chain(config: Path, crashes: list[str], api: str) -> tuple[Run, float, str]:
    """Kill one `rlme train` process at each point in turn, each resuming what the one before left; then
    resume to the end. Every commit, once made, never changes."""
    run = Run.for_config(load_config(config))
    seen_manifests: dict[int, bytes] = {}
    t0 = time.perf_counter()
    for point in crashes:
        p = _train_process(config, point, api)
        assert p.returncode == -signal.SIGKILL, f"{point}: expected SIGKILL, got {p.returncode}\n{p.stderr[-3000:]}"
        for i in run.committed():  # a commit, once made, never changes
            now = run.store.read_bytes(f"iter-{i:06d}/MANIFEST.json")
            assert seen_manifests.setdefault(i, now) == now
    p = _train_process(config, None, api)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run, time.perf_counter() - t0, " ".join(p.stdout.split())


def _same_as(run: Run, ref: Run, iterations: int, tables: tuple[str, ...]) -> int:
    """gc, verify, and the uninterrupted run's files byte for byte; returns how many leftovers gc removed."""
    assert run.committed() == list(range(iterations))
    leftovers = gc.plan(run).files
    gc.apply(run)
    assert verify(run).ok
    # Same files, byte for byte: rollouts (ids, texts, token ids, logprobs), scores, rewards, checkpoints.
    assert _contents(run) == _contents(ref)
    for i in range(iterations):
        rollouts = run.read_table(i, "rollouts.parquet")
        assert rollouts["rollout_id"].n_unique() == rollouts.height == 2 * 2
        for table in tables:
            assert run.read_table(i, table).equals(ref.read_table(i, table)), (i, table)
    return len(leftovers)


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_uninterrupted_result(s3, micro_config, tmp_path, prefect_server):
    # The reference: the same config, uninterrupted, in this process, on local disk.
    ref_cfg = load_config(_with_eval(micro_config(str(tmp_path / "ref"), iterations=2)))
    ref = Run.for_config(ref_cfg)
    train(ref_cfg, ref)

    config = _with_eval(micro_config(s3.url(), iterations=2))
    run, chain_s, out = _chain(config, CRASHES, prefect_server)
    assert "trained now: [1]" in out  # the flow finished what the kills left
    removed = _same_as(run, ref, 2, ("rollouts.parquet", "scores.parquet", "eval.parquet"))
    assert removed, "the kills inside upload and after aggregate's data file must have left attempt files"
    print(f"crash chain: {len(CRASHES)} kills + 1 resume in {chain_s:.1f}s; gc removed {removed} files")


# checkpoint.full_every 3 and background_write (4 iterations, eval at 0 and 3: it joins the write before it
# reads the checkpoint): checkpoints 0 and 1 hold the weights only, 2 and 3 the full state. Kills: inside the
# background write of 0 (light); while iteration 2 samples ahead with update 1's write in flight (0 committed,
# light); after update 1's write is joined, before its record (the resume replays update 0); after generate
# 2's table, written after MANIFEST(1) (0 and 1 light: the resume replays both); inside the background write
# of the full state of 2, while iteration 3 samples ahead. The last process replays 0 and 1 again, and
# commits iteration 3 with the rollouts it sampled while 2's checkpoint was written.
LIGHT_CRASHES = [
    "upload:background@0",
    "generate:mid@2",
    "update:written@1",
    "generate:written@2",
    "upload:background@2",
]


def _light(config: Path) -> Path:
    d = yaml.safe_load(config.read_text())
    d["checkpoint"] = {"full_every": 3, "background_write": True}
    d["eval"] = {"every": 3, "path": str(ROOT / "data" / "demo_heldout.jsonl"), "prompts": 2}
    config.write_text(yaml.safe_dump(d))
    return config


@pytest.mark.slow
def test_light_checkpoints_and_background_writes_killed_anywhere_resume_to_the_uninterrupted_result(
    s3, micro_config, tmp_path, prefect_server
):
    ref_cfg = load_config(_light(micro_config(str(tmp_path / "ref"), iterations=4)))
    ref = Run.for_config(ref_cfg)
    train(ref_cfg, ref)
    full = [i for i in ref.committed() if checkpoint.is_full(checkpoint.files_of(ref.manifest(i).files, i))]
    assert full == [2, 3]

    run, chain_s, out = _chain(_light(micro_config(s3.url(), iterations=4)), LIGHT_CRASHES, prefect_server)
    assert "trained now: [2, 3]" in out
    removed = _same_as(run, ref, 4, ("rollouts.parquet", "scores.parquet", "rewards.parquet"))
    assert removed, "the kills inside the background writes must have left attempt files"
    assert run.read_table(3, "eval.parquet").equals(ref.read_table(3, "eval.parquet"))
    assert run.manifest(2).metrics["replayed_updates"] == 2  # the last process replayed updates 0 and 1
    assert "sampled_ahead_seconds" in run.manifest(3).metrics  # generate 3 sampled while 2 was written
    print(f"light chain: {len(LIGHT_CRASHES)} kills + 1 resume in {chain_s:.1f}s; gc removed {removed} files")
