"""`rlme status` as a user (or a worker's log) sees it: piped output at 80 columns with no number cut,
`--json`, an iteration left uncommitted by a killed trainer, a run that adopted other questions (a phase)
with a held-out eval still to do, a missing run, `--version` and `--debug`."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from rlme_flows.cli import app
from rlme_flows.status import NoRun, duration, number
from typer.testing import CliRunner

from rlme_pipeline.config import load_config
from rlme_pipeline.evolve import adopt
from rlme_pipeline.jobs.train import train
from rlme_pipeline.storage.run import Run, code_version
from tests.conftest import demo_dict

ROOT = Path(__file__).resolve().parents[2]
TRAIN = (
    "import sys; from rlme_pipeline.config import load_config; from rlme_pipeline.jobs.train import train; "
    "from rlme_pipeline.storage.run import Run; cfg = load_config(sys.argv[1]); train(cfg, Run.for_config(cfg))"
)


def _rlme(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with stdout piped: rich falls back to COLUMNS, else 80."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    cmd = [sys.executable, "-m", "rlme_flows.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _header(stdout: str) -> list[str]:
    return next(line.split() for line in stdout.splitlines() if line.split()[:1] == ["iter"])


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
    assert "ph" not in _header(p.stdout) and "phase" not in p.stdout  # one phase: the table as before
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

    # a run trained past the target it was created with (`--iterations` later): no "2 of 1"
    from rich.console import Console
    from rlme_flows.status import collect, render

    past = {**collect(run), "iterations_target": 0}
    out = Console(file=io.StringIO(), width=80)
    render(past, out)
    assert "\n1 iterations committed" in out.file.getvalue() and " of 0 " not in out.file.getvalue()
    assert [(p["phase"], p["from_iteration"]) for p in d["phases"]] == [(0, 0)] and busy["phase"] == 0


@pytest.fixture
def phased_run(micro_config, tmp_path) -> tuple[Run, Path]:
    """The micro run with a held-out eval each iteration: iteration 0 in the run's own questions, phase 1
    (another question, adopted from a file) from iteration 1, committed; iteration 2 killed after its
    update's data file was written: update and eval are still to do."""
    heldout = str(ROOT / "data" / "demo_heldout.jsonl")

    config = micro_config(str(tmp_path / "runs"), iterations=3)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "eval": {"every": 1, "path": heldout, "prompts": 2}}))  # fmt: skip
    run = Run.from_url(str(tmp_path / "runs" / "micro"))
    train(load_config(config), run, advance=1)
    questions = tmp_path / "adopted.yaml"
    questions.write_text(yaml.safe_dump(demo_dict()["questions"][1:]))
    train(load_config(config), run, advance=1, adopt=adopt.load(str(questions)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLME_CRASH_AT": "update:written@2"}
    p = subprocess.run([sys.executable, "-c", TRAIN, str(config)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, (
        f"expected the crash hook to kill training: {p.returncode}\n{p.stderr[-3000:]}"
    )
    assert run.committed() == [0, 1]
    return run, questions


def test_status_shows_the_phase_of_each_iteration_and_a_pending_eval(phased_run):
    run, questions = phased_run
    p = _rlme("status", run.url)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert max(map(len, lines[1:])) <= 80 and "…" not in p.stdout, p.stdout
    text = " ".join(p.stdout.split())
    assert "2 of 3 iterations committed" in text and f"phase 1 from iteration 1 (file {questions})" in text, p.stdout
    assert _header(p.stdout)[:3] == ["iter", "ph", "reward"], p.stdout
    rows = {r[0]: r for r in (line.split() for line in lines) if r[:1] in (["0"], ["1"])}
    assert (rows["0"][1], rows["1"][1]) == ("0", "1"), p.stdout
    assert re.search(
        r"iteration 2 \(phase 1\) not committed: done generate [\d.]+s, score [\d.]+s, aggregate [\d.]+s; "
        r"to do: update, eval ",
        text,
    ), text

    narrow = _rlme("status", run.url, columns=40).stdout
    assert _header(narrow)[:3] == ["iter", "ph", "reward"], narrow  # the phase stays as the table narrows

    d = json.loads(_rlme("status", run.url, "--json").stdout)
    assert [(x["phase"], x["from_iteration"]) for x in d["phases"]] == [(0, 0), (1, 1)]
    assert d["phases"][1]["source"] == {"kind": "file", "path": str(questions)}
    assert d["phases"][1]["questions_sha"] == run.manifest(1).lineage["questions_sha"]
    assert d["phases"][1]["question_ids"] == [demo_dict()["questions"][1]["id"]]
    assert [(c["iteration"], c["phase"]) for c in d["committed"]] == [(0, 0), (1, 1)]
    (busy,) = d["in_progress"]
    assert (busy["iteration"], busy["phase"]) == (2, 1)
    assert busy["stages_done"] == ["generate", "score", "aggregate"] and busy["stages_todo"] == ["update", "eval"]


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
