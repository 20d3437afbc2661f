"""Re-score shards on a real local Ray cluster (a head on 127.0.0.1 with 2 CPUs, started and stopped here):
the same score set as the sequential re-score, byte for byte, also when a worker dies mid-shard; an
unreachable address is one line before anything starts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks._common import local_ray_head
from rlme_pipeline import scoreset
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.storage.run import Run
from tests.conftest import ROOT, copy_run
from tests.integration import test_cli_errors, test_rescore
from tests.integration.test_cli_errors import one_line_error
from tests.integration.test_rescore import QUESTIONS
from tests.requires import require

# the fixtures of those modules, used here too
trained_run, no_prefect = test_rescore.trained_run, test_cli_errors.no_prefect

SHARD_ROWS = 27  # the demo's 128 rollouts an iteration: 5 uneven shards each, 10 in all

# Ray on one machine, on the loopback: the head, its workers and this process (the driver) must agree on
# the node's address, and Ray reads this when it is first imported. Ray-only: nothing else reads it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tiny_models):
    """A local head of 2 CPUs on 127.0.0.1 for the module (benchmarks._common.local_ray_head); its workers
    find the session's tiny models (RLME_CACHE is inherited)."""
    require("ray", "prefect_ray")
    with local_ray_head(2) as address:
        yield address


@pytest.fixture(scope="module")
def questions_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("q") / "questions.yaml"
    p.write_text(QUESTIONS, encoding="utf-8")
    return p


def committed_files(run: Run, name: str) -> dict[str, tuple[str, int]]:
    m = scoreset.unit(run, name).manifest()
    return {f.name: (f.sha256, f.rows) for f in m.files}


@pytest.fixture(scope="module")
def sequential(trained_run, tmp_path_factory, questions_path) -> dict[str, tuple[str, int]]:
    """The score set made in this process, shard after shard, with one torch thread like a Ray worker of
    one CPU (Ray sets OMP_NUM_THREADS to the task's CPUs; more threads may sum logits in another order)."""
    import torch

    run = copy_run(trained_run, tmp_path_factory.mktemp("sequential"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rescore(run, "v2", questions=scoreset.load_questions(questions_path), shard_rows=SHARD_ROWS)
    finally:
        torch.set_num_threads(threads)
    return committed_files(run, "v2")


def rescore_on_ray(run: Run, questions: Path, address: str) -> str:
    """`rlme rescore --ray` in a process of its own, as a user runs it (the driver joins and leaves the
    cluster; Prefect's temporary server is its own)."""
    args = ["rescore", run.url, "--name", "v2", "--questions", str(questions), "--shard-rows", str(SHARD_ROWS)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run(
        [sys.executable, "-m", "rlme_flows.cli", *args, "--ray", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


def test_ray_rescore_is_the_sequential_score_set(trained_run, tmp_path, questions_path, sequential, ray_head):
    run = copy_run(trained_run, tmp_path)
    out = rescore_on_ray(run, questions_path, ray_head)
    n = sum(-(-run.manifest(i).files[0].rows // SHARD_ROWS) for i in run.committed())  # shards, uneven last ones
    assert re.search(rf"\({n} of {n} shards scored now, on [12] Ray workers\)", out), out
    assert committed_files(run, "v2") == sequential  # same logical files, same bytes, same rows


def shard_workers() -> list[int]:
    """Ray worker processes running a shard now: Ray titles a worker by the task it runs."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::rescore-shard"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_a_worker_killed_mid_shard_changes_nothing(trained_run, tmp_path, questions_path, sequential, ray_head):
    """SIGKILL the first worker seen scoring a shard: Ray resubmits that shard to another worker, the
    write-once shard commit keeps one copy, and the committed score set is the sequential one."""
    run = copy_run(trained_run, tmp_path)
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            if pids := shard_workers():
                time.sleep(0.3)  # inside the shard: reading, loading the judges or scoring
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rescore_on_ray(run, questions_path, ray_head)
    finally:
        stop.set()
        t.join()
    assert killed, "no shard was seen running on a Ray worker"
    assert committed_files(run, "v2") == sequential


def test_unreachable_or_malformed_ray_address_is_one_line_before_anything(trained_run, tmp_path, no_prefect):
    require("ray", "prefect_ray")
    run = copy_run(trained_run, tmp_path)
    q = tmp_path / "q.yaml"
    q.write_text(QUESTIONS, encoding="utf-8")
    base = ["rescore", run.url, "--name", "v2", "--questions", str(q), "--ray"]
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    one_line_error([*base, dead], f"--ray {dead}", "no Ray cluster answers", "ray://HOST:10001")
    one_line_error([*base, f"ray://{dead}"], "no Ray cluster answers", "'local'")
    one_line_error([*base, "http://head:8265"], "not a Ray address", "HOST:6379")
    one_line_error([*base, "head"], "not a Ray address")
    assert not no_prefect and not run.store.exists("scoresets")
