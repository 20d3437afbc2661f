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


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_uninterrupted_result(s3, micro_config, tmp_path, prefect_server):
    # The reference: the same config, uninterrupted, in this process, on local disk.
    ref_cfg = load_config(_with_eval(micro_config(str(tmp_path / "ref"), iterations=2)))
    ref = Run.for_config(ref_cfg)
    train(ref_cfg, ref)

    config = _with_eval(micro_config(s3.url(), iterations=2))
    run = Run.for_config(load_config(config))
    seen_manifests: dict[int, bytes] = {}
    t0 = time.perf_counter()
    for point in CRASHES:
        p = _train_process(config, point, prefect_server)
        assert p.returncode == -signal.SIGKILL, f"{point}: expected SIGKILL, got {p.returncode}\n{p.stderr[-3000:]}"
        for i in run.committed():  # a commit, once made, never changes
            now = run.store.read_bytes(f"iter-{i:06d}/MANIFEST.json")
            assert seen_manifests.setdefault(i, now) == now
    p = _train_process(config, None, prefect_server)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "trained now: [1]" in " ".join(p.stdout.split())  # the flow finished what the kills left
    chain_s = time.perf_counter() - t0

    assert run.committed() == [0, 1]
    leftovers = gc.plan(run).files
    assert leftovers, "the kills inside upload and after aggregate's data file must have left attempt files"
    gc.apply(run)
    assert verify(run).ok

    # Same files, byte for byte: rollouts (ids, texts, token ids, logprobs), scores, rewards, checkpoints.
    assert _contents(run) == _contents(ref)
    for i in (0, 1):
        rollouts = run.read_table(i, "rollouts.parquet")
        assert rollouts["rollout_id"].n_unique() == rollouts.height == 2 * 2
        assert rollouts.equals(ref.read_table(i, "rollouts.parquet"))
        assert run.read_table(i, "scores.parquet").equals(ref.read_table(i, "scores.parquet"))
        assert run.read_table(i, "eval.parquet").equals(ref.read_table(i, "eval.parquet"))
    print(f"crash chain: {len(CRASHES)} kills + 1 resume in {chain_s:.1f}s; gc removed {len(leftovers)} files")
