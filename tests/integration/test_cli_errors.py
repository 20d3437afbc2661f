"""User errors of `rlme rescore | audit | train | status` exit 2 with one line naming the field or file and
the fix, before Prefect starts: the flow is never entered, so no FAILED flow run is recorded. Storage
options reach every file argument and every command (s3:// questions file, endpoint only in -o)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import rlme_flows.cli
from rlme_flows.cli import app
from typer.testing import CliRunner

from rlme_pipeline import scoreset
from rlme_pipeline.config import load_config
from rlme_pipeline.storage.run import Run
from tests.conftest import DEMO, ROOT, copy_run, demo_variant, trained_demo, write_config

GOOD_QUESTIONS = "- id: short\n  text: Is the answer short?\n  weight: -0.5\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models) -> Run:
    """One committed iteration of the demo, trained once for the module (tests copy it)."""
    return trained_demo(tmp_path_factory.mktemp("trained"), iterations=1)


@pytest.fixture
def run(trained, tmp_path) -> Run:
    return copy_run(trained, tmp_path)


@pytest.fixture
def no_prefect(monkeypatch):
    """Entering the CLI's Prefect context fails the test: a user error must be caught before it."""
    entered = []

    @contextmanager
    def refuse():
        entered.append(True)
        raise AssertionError("Prefect was started for a user error")
        yield  # pragma: no cover

    monkeypatch.setattr(rlme_flows.cli, "local_prefect", refuse)
    return entered


def one_line_error(args: list[str], *expected: str) -> str:
    r = CliRunner().invoke(app, args, terminal_width=100)
    out = r.output.strip()
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}{r.exception!r}"
    assert out.startswith("error: ") and "\n" not in out, out
    for e in expected:
        assert e in out, out
    assert "Traceback" not in out and "flow run" not in out.lower()
    return out


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# --- rescore ------------------------------------------------------------------------------------------
RESCORE_CASES = {
    "missing questions file": (
        lambda t, r: ["--questions", str(t / "nope.yaml")],
        ["--questions", "nope.yaml", "no such file"],
    ),
    "bad YAML": (
        lambda t, r: ["--questions", write(t, "q.yaml", "- id: a\n  text: [unclosed\n")],
        ["q.yaml: not valid YAML", "give a YAML list"],
    ),
    "unknown field": (
        lambda t, r: ["--questions", write(t, "q.yaml", "- id: a\n  txt: Is it?\n")],
        ["--questions", "questions.0.txt: unknown field"],
    ),
    "missing field": (
        lambda t, r: ["--questions", write(t, "q.yaml", "- id: a\n")],
        ["questions.0.text: required field is missing"],
    ),
    "not a list": (lambda t, r: ["--questions", write(t, "q.yaml", "just text\n")], ["expected a non-empty list"]),
    "bad evaluators field": (
        lambda t, r: ["--evaluators", write(t, "e.yaml", "- name: x\n  model: policy\n  weight: heavy\n")],
        ["--evaluators", "evaluators.0.weight"],
    ),
    "bad iterations": (
        lambda t, r: ["--questions", write(t, "q.yaml", GOOD_QUESTIONS), "--iterations", "5:9"],
        ["--iterations '5:9'", "not committed"],
    ),
    "bad name": (
        lambda t, r: ["--questions", write(t, "q.yaml", GOOD_QUESTIONS), "--name", "train"],
        ["--name 'train'"],
    ),
    "secret option": (
        lambda t, r: ["--questions", write(t, "q.yaml", GOOD_QUESTIONS), "-o", "secret=abc"],
        ["--storage-option ['secret']", "environment"],
    ),
}


@pytest.mark.parametrize("case", list(RESCORE_CASES))
def test_rescore_user_errors_exit_2_before_prefect(case, run, tmp_path, no_prefect):
    make, expected = RESCORE_CASES[case]
    extra = make(tmp_path, run)
    name = [] if "--name" in extra else ["--name", "v2"]
    one_line_error(["rescore", run.url, *name, *extra], *expected)
    assert not no_prefect and not run.store.exists("scoresets")


def test_rescore_of_an_existing_score_set_without_resume(run, tmp_path, no_prefect):
    q = write(tmp_path, "q.yaml", GOOD_QUESTIONS)
    scoreset.plan(run, "v2", questions=scoreset.load_questions(q))  # an interrupted re-score: defined, no shard
    out = one_line_error(
        ["rescore", run.url, "--name", "v2", "--questions", q], "--name 'v2'", "already exists", "interrupted"
    )
    assert "--resume" in out
    assert not no_prefect


def test_missing_and_copied_runs_are_one_line_everywhere(run, tmp_path, no_prefect):
    q = write(tmp_path, "q.yaml", GOOD_QUESTIONS)
    nope = str(tmp_path / "runs" / "nope")
    one_line_error(["rescore", nope, "--name", "v2", "--questions", q], "no rlme run here")
    one_line_error(["audit", nope, "--out", str(tmp_path / "a")], "no rlme run here")
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run.store.root, copy)
    fix = ["run.json belongs to run 'demo', not 'copy'", "Rename the directory back to 'demo'"]
    one_line_error(["rescore", str(copy), "--name", "v2", "--questions", q], *fix)
    one_line_error(["audit", str(copy), "--out", str(tmp_path / "a")], *fix)
    one_line_error(["status", str(copy)], *fix)
    assert not no_prefect and not (tmp_path / "a").exists()


# --- audit --------------------------------------------------------------------------------------------
def test_audit_unknown_score_sets_exit_2_before_prefect(run, tmp_path, no_prefect):
    out = str(tmp_path / "audit")
    one_line_error(
        ["audit", run.url, "--out", out, "--scoreset", "nope"],
        "--scoreset nope",
        "not committed",
        "choose one of: train",
    )
    one_line_error(
        ["audit", run.url, "--out", out, "--compare", "v9"], "--compare v9", "not committed", "choose one of: train"
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(["audit", run.url, "--out", str(blocker / "audit")], "--out", "is not writable")
    assert not no_prefect and not Path(out).exists()


# --- train: a refused resume names the changed fields -------------------------------------------------
def test_changed_experiment_names_each_field_old_to_new(run, tmp_path, no_prefect):
    d = demo_variant(tmp_path / "runs", iterations=2, optimizer={"lr": 3e-4})
    d["questions"][0]["weight"] = 2.0
    cfg = write_config(d, tmp_path, "changed")
    before = run.store.read_bytes("run.json")
    one_line_error(
        ["train", str(cfg)],
        "run demo exists with another experiment:",
        "optimizer.lr 0.001 -> 0.0003",
        "questions[0].weight 1.0 -> 2.0",
        "start a new --run-id",
    )
    assert run.store.read_bytes("run.json") == before and run.iterations() == [0]
    assert not no_prefect


def test_a_damaged_resume_point_is_refused_before_prefect(run, tmp_path, no_prefect):
    """The newest commit's checkpoint no longer matches its hash: one line, before Prefect starts (it used
    to come after the temporary server had started, under a 30-line traceback), and nothing is changed."""
    [weights] = [f for f in run.manifest(0).files if f.logical.endswith("model.safetensors")]
    path = Path(run.store.root) / weights.path
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    cfg = write_config(demo_variant(tmp_path / "runs", iterations=2), tmp_path)
    one_line_error(["train", str(cfg)], "committed iteration 0 is damaged", "rlme verify")
    assert run.iterations() == [0] and not no_prefect


def test_evolve_proposer_arguments_are_checked_by_the_proposer_config(run, no_prefect):
    """`rlme evolve` validates its proposer flags with config.ProposerConfig, the definition `evolve:` and
    the flow use, and names each flag."""
    url = str(run.store.root)
    one_line_error(["evolve", url, "--proposer", "rules", "--backend", "tgi"], "--backend: Input should be")
    one_line_error(
        ["evolve", url, "--proposer", "rules", "--temperature", "0"], "--temperature: Input should be greater than 0"
    )
    one_line_error(["evolve", url, "--proposer", "tiny:policy", "--max-new-tokens", "0"], "--max-new-tokens")
    assert not no_prefect


def test_refusal_without_a_readable_snapshot_falls_back_to_the_hashes(run, demo_cfg):
    from rlme_pipeline.storage.run import RunMismatch

    meta = run.store.read_json("run.json")
    meta["config"]["optimizer"]["no_such_field"] = 1  # a snapshot this code cannot read, of another experiment
    meta["config_hash"] = "f" * 64
    run.store.write_json("run.json", meta)
    with pytest.raises(RunMismatch, match=r"another experiment: config hash ffffffffffff -> [0-9a-f]{12}; start a new"):
        run.check(load_config(DEMO).with_overrides(storage=str(Path(run.store.root).parent)))


# --- storage options on every file argument and every command -----------------------------------------
def test_s3_questions_file_with_the_endpoint_only_in_storage_options(s3, run, tmp_path, monkeypatch):
    """The run and the questions file on S3, the endpoint named only by -o: a bad field is reported from
    the S3 file before Prefect starts (no server is reachable: any contact would fail); a good one is
    re-scored and audited through the flows with the same options."""
    s3.fs.put(run.store.root, f"{s3.name}/runs/demo", recursive=True)
    s3.fs.pipe(f"{s3.name}/q/bad.yaml", b"- id: a\n  text: Is it?\n  weight: heavy\n")
    s3.fs.pipe(f"{s3.name}/q/good.yaml", GOOD_QUESTIONS.encode())
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    run_url, opt = f"s3://{s3.name}/runs/demo", ["-o", f"endpoint_url={s3.endpoint}"]

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "RLME_STORE_ATTEMPTS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "rlme_flows.cli",
        "rescore",
        run_url,
        "--name",
        "v2",
        "--questions",
        f"s3://{s3.name}/q/bad.yaml",
    ]
    p = subprocess.run([*cmd, *opt], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        p.stdout.startswith("error: --questions s3://")
        and "questions.0.weight" in p.stdout
        and p.stdout.count("\n") == 1
    )
    assert p.stderr == "", p.stderr  # nothing from Prefect (a server contact would fail loudly here)
    assert not s3.fs.exists(f"{s3.name}/runs/demo/scoresets")

    env.pop("PREFECT_API_URL")  # fresh processes, as a user runs them: Prefect's temporary server
    env.pop("RLME_STORE_ATTEMPTS")
    p = subprocess.run(
        [*cmd[:-1], f"s3://{s3.name}/q/good.yaml", *opt], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout + p.stderr
    s3.fs.invalidate_cache()
    assert s3.fs.exists(f"{s3.name}/runs/demo/scoresets/v2/MANIFEST.json")
    out = f"s3://{s3.name}/audit"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlme_flows.cli",
            "audit",
            run_url,
            "--out",
            out,
            "--scoreset",
            "v2",
            "--compare",
            "train",
            "--probe-prompts",
            "0",
            *opt,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    s3.fs.invalidate_cache()
    assert s3.fs.exists(f"{s3.name}/audit/report.html") and s3.fs.exists(f"{s3.name}/audit/compare.parquet")
    # the options travelled as flow parameters: they, and so the Prefect database, hold no credential
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert all(secret not in s3.fs.cat_file(o) for o in s3.fs.find(s3.name))
    dbs = list(Path(os.environ["PREFECT_HOME"]).rglob("*.db"))
    assert dbs and all(secret not in db.read_bytes() for db in dbs)
