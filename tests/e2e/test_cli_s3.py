"""`rlme train | verify | gc` on S3 through the Prefect flow, as a user runs them: the lease turns a second
trainer away naming the first, and the secret key appears in nothing the run writes or logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlme_pipeline.storage.lease import Lease
from rlme_pipeline.storage.run import Run

ROOT = Path(__file__).resolve().parents[2]


def rlme(*args: str, prefect_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(prefect_home), "COLUMNS": "200"}
    code = "from rlme_flows.cli import app; app()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_cli_on_s3_lease_and_no_secret_anywhere(s3, micro_config, tmp_path):
    config = micro_config(s3.url(), iterations=1, run_id="cli-run")
    run_url = f"{s3.url()}/cli-run"
    home = tmp_path / "prefect"
    outputs = []

    with Lease(Run.from_url(run_url).store, ttl=60, purpose="someone else"):
        p = rlme("train", str(config), prefect_home=home)
        outputs.append(p.stdout + p.stderr)
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"is being trained by pid {os.getpid()}" in p.stdout and "purpose someone else" in p.stdout

    p = rlme("train", str(config), prefect_home=home)
    outputs.append(p.stdout + p.stderr)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    from rlme_flows.cli import app
    from typer.testing import CliRunner

    for args in (("verify", run_url), ("gc", run_url), ("status", run_url)):  # in-process: no train, no Prefect
        r = CliRunner().invoke(app, list(args), terminal_width=200)
        outputs.append(r.output)
        assert r.exit_code == 0, r.output
    assert "ok: every committed file matches its manifest" in outputs[2]
    assert "would delete 0 files" in outputs[3]

    # grep: every log line, every object in the bucket, the Prefect database (flow parameters, task
    # results, logs, artifacts) and every local file the run touched.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert all(secret not in o.encode() for o in outputs)
    s3.fs.invalidate_cache()
    objects = s3.fs.find(s3.name)
    assert any(o.endswith("/MANIFEST.json") for o in objects) and any(o.endswith("/run.json") for o in objects)
    leaks = [o for o in objects if secret in s3.fs.cat_file(o)]
    local = [f for base in (tmp_path, Path(os.environ["RLME_CACHE"])) for f in base.rglob("*") if f.is_file()]
    assert any(f.suffix == ".db" for f in home.rglob("*")), "expected the Prefect server's database under PREFECT_HOME"
    leaks += [str(f) for f in local if secret in f.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_cli_train_reaches_the_endpoint_given_only_in_the_config(s3, micro_config, monkeypatch, tmp_path):
    """run.storage_options.endpoint_url is the only place the S3 endpoint is named: the CLI's preflight
    write, the flow and `status` all use it (a Store built without the config's options would send the
    preflight write to the default AWS endpoint)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("RLME_STORE_ATTEMPTS", "1")  # a misdirected write fails at once, not after backoff
    config = micro_config(
        s3.url(), iterations=1, run_id="endpoint-in-config", storage_options={"endpoint_url": s3.endpoint}
    )
    # a process of its own, as a user runs it (an in-process flow would share Prefect's logging with others)
    p = rlme("train", str(config), prefect_home=tmp_path / "prefect")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    s3.fs.invalidate_cache()
    assert s3.fs.exists(f"{s3.name}/runs/endpoint-in-config/iter-000000/MANIFEST.json")
    assert "1 of 1 iterations committed" in p.stdout
