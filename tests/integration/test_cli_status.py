"""`rlme status` as a user (or a worker's log) sees it: piped output at 80 columns with no number cut,
`--json`, an iteration left uncommitted by a killed trainer, a missing run, `--version` and `--debug`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlme_flows.cli import app
from rlme_flows.status import NoRun, duration, number
from rlme_pipeline.run import Run, code_version

ROOT = Path(__file__).resolve().parents[2]
TRAIN = (
    "import sys; from rlme_pipeline.config import load_config; from rlme_pipeline.runner import train; "
    "from rlme_pipeline.run import Run; cfg = load_config(sys.argv[1]); train(cfg, Run.for_config(cfg))"
)


def _rlme(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with stdout piped: rich falls back to COLUMNS, else 80."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    cmd = [sys.executable, "-m", "rlme_flows.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def interrupted_run(micro_config, tmp_path) -> Run:
    """Iteration 0 committed; the trainer SIGKILLed in iteration 1 after aggregate's data file was written,
    before its stage record: generate and score are recorded, the rest is not."""
    config = micro_config(str(tmp_path / "runs"), iterations=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLME_CRASH_AT": "aggregate:written@1"}
    p = subprocess.run([sys.executable, "-c", TRAIN, str(config)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, (
        f"expected the crash hook to kill training: {p.returncode}\n{p.stderr[-3000:]}"
    )
    run = Run.from_url(str(tmp_path / "runs" / "micro"))
    assert run.committed() == [0]
    return run


def test_status_reads_at_80_columns_shows_the_uncommitted_iteration_and_prints_json(interrupted_run):
    run = interrupted_run
    m = run.manifest(0)
    p = _rlme("status", run.url)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"run {run.url}"  # whole, to copy (the terminal may wrap it)
    assert max(map(len, lines[1:])) <= 80 and "…" not in p.stdout, p.stdout  # nothing cut, nothing wider
    row = next(line.split() for line in lines if line.split()[:1] == ["0"])  # iteration 0's row
    x = m.metrics
    want = [number(x["reward_mean"]), number(x["reward_std"]), f"{x['failed_share']:.1%}", number(x["loss"])]
    assert row[1:5] == want, (row, want)
    assert duration(sum(m.timings.values())) in row
    text = " ".join(p.stdout.split())
    assert "1 of 2 iterations committed" in text
    assert re.search(
        r"iteration 1 not committed: done generate [\d.]+s, score [\d.]+s; to do: aggregate, update", text
    ), text
    assert f"reward_mean {number(x['reward_mean'])}" in text  # the newest iteration's metrics, listed in full

    narrow = _rlme("status", run.url, columns=40)
    assert narrow.returncode == 0 and "…" not in narrow.stdout, narrow.stdout
    assert max(map(len, narrow.stdout.splitlines()[1:])) <= 40, narrow.stdout
    assert "not shown at 40 columns:" in narrow.stdout

    p = _rlme("status", run.url, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["run"] == run.url and d["iterations_target"] == 2
    assert [c["iteration"] for c in d["committed"]] == [0]
    assert d["committed"][0]["metrics"] == json.loads(json.dumps(m.metrics))
    assert d["committed"][0]["timings"] == m.timings
    (busy,) = d["in_progress"]
    assert busy["iteration"] == 1 and busy["stages_done"] == ["generate", "score"]
    assert busy["stages_todo"] == ["aggregate", "update"]
    assert busy["seconds"]["score"] == pytest.approx(run.read_record(1, "score").seconds, abs=1e-3)


def test_status_of_a_missing_run_exits_2_with_one_line(tmp_path):
    nope = str(tmp_path / "runs" / "nope")
    r = CliRunner().invoke(app, ["status", nope])
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    assert r.output.startswith("error: ") and nope in r.output and "rlme train" in r.output
    r = CliRunner().invoke(app, ["status", "nope"])  # not even {storage}/{run_id}
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "expected {storage}/{run_id}" in r.output

    r = CliRunner().invoke(app, ["--debug", "status", nope])  # --debug: the exception itself
    assert r.exit_code == 1 and isinstance(r.exception, NoRun)
    r = CliRunner().invoke(app, ["status", nope])  # and the next invocation is back to one line
    assert r.exit_code == 2 and r.output.count("\n") == 1


def test_version_names_the_package_and_the_commit():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    commit = code_version()["git_commit"]
    assert r.output.strip() == f"rlme {version('rlme')}" + (f" (git {commit[:12]})" if commit else "")
