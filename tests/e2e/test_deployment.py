"""The deployments of prefect.yaml on a real `prefect server start`, worked by a real process worker.

The steps are the runbook's (docs/deploy.md): infra/start-server.sh, `prefect work-pool create`,
`prefect deploy --all`, infra/start-worker.sh, `prefect deployment run`. Config and run live in a moto S3
bucket; the worker gets nothing but the package on PYTHONPATH and AWS_* credentials in its environment.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlme_pipeline.storage import gc
from rlme_pipeline.storage.lease import Lease
from rlme_pipeline.storage.run import Run
from tests.conftest import ROOT

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prefect:
    """A Prefect server + process worker for one module; every process in its own group, killed at the end."""

    def __init__(self, home: Path, env: dict):
        self.home, self.env, self.procs = home, env, []
        self.api = env["PREFECT_API_URL"]

    def start(self, script: str, log: str) -> subprocess.Popen:
        f = open(self.home / log, "wb")
        p = subprocess.Popen(
            ["bash", script], cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(p)
        return p

    def cli(self, *args: str, timeout: float = 180) -> str:
        p = subprocess.run(["prefect", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"prefect {' '.join(args)}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout

    def wait_healthy(self, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            try:
                with urllib.request.urlopen(self.api + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.procs[0].poll() is None, (self.home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout}s")

    def run_deployment(self, name: str, **params) -> str:
        """`prefect deployment run NAME --param k=v ...`; returns the flow run id."""
        args = [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
        out = self.cli("deployment", "run", name, *args)
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        class _Client:
            def __enter__(s):
                s._settings = temporary_settings({PREFECT_API_URL: self.api})
                s._settings.__enter__()
                s._client = get_client(sync_client=True)
                return s._client.__enter__()

            def __exit__(s, *exc):
                s._client.__exit__(*exc)
                s._settings.__exit__(*exc)

        return _Client()

    def wait(self, *flow_run_ids: str, timeout: float = 400) -> list:
        end = time.time() + timeout
        with self.client() as c:
            while True:
                runs = [c.read_flow_run(uuid.UUID(i)) for i in flow_run_ids]
                if all(r.state and r.state.type.value in TERMINAL for r in runs):
                    return runs
                if time.time() > end:
                    raise TimeoutError(
                        f"flow runs not finished: {[(r.name, r.state_name) for r in runs]}\n{self.logs()}"
                    )
                time.sleep(1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.home.glob("*.log"))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


@pytest.fixture(scope="module")
def prefect(moto_endpoint, tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-deploy")
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),  # the package, as an installed one would be (flow entrypoints are modules)
        "PREFECT_HOME": str(home / "home"),
        "PREFECT_SERVER_PORT": str(port),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Test only: the cron schedule must not add runs while the test triggers its own.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_CLI_COLORS": "false",
        "COLUMNS": "200",
        # What a worker host exports for S3 (moto accepts any credentials).
        "AWS_ACCESS_KEY_ID": "rlme-worker-key",
        "AWS_SECRET_ACCESS_KEY": "rlme-worker-secret",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }  # RLME_CACHE (tiny models already built) and HF_*_OFFLINE come from conftest via os.environ
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.pop(k, None)
    pf = Prefect(home, env)
    try:
        pf.start("infra/start-server.sh", "server.log")
        pf.wait_healthy()
        pf.cli("work-pool", "create", "rlme-process", "--type", "process")
        pf.cli("--no-prompt", "deploy", "--all")
        pf.start("infra/start-worker.sh", "worker.log")
        yield pf
    finally:
        pf.stop()


def s3_config(s3, micro_config, run_id: str) -> str:
    """The micro config, uploaded to the bucket: the deployment gets a config URI, not a local file."""
    local = micro_config(s3.url(), iterations=1, run_id=run_id)
    uri = f"s3://{s3.name}/configs/{run_id}.yaml"
    s3.fs.pipe(uri.removeprefix("s3://"), local.read_bytes())
    return uri


def task_names(pf: Prefect, flow_run_id: str) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with pf.client() as c:
        trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
    return sorted(t.name for t in trs)


@pytest.mark.slow
def test_scheduled_deployment_continues_the_same_run(prefect, s3, micro_config):
    config = s3_config(s3, micro_config, "sched")
    run_uri = f"{s3.url()}/sched"
    first = prefect.run_deployment("rlme_train/scheduled", config=config, run_uri=run_uri, advance=1)
    [r1] = prefect.wait(first)
    assert r1.state.is_completed(), prefect.logs()
    assert Run.from_url(run_uri).committed() == [0]
    second = prefect.run_deployment("rlme_train/scheduled", config=config, run_uri=run_uri, advance=1)
    [r2] = prefect.wait(second)
    assert r2.state.is_completed(), prefect.logs()

    run = Run.from_url(run_uri)
    assert run.committed() == [0, 1]  # the second run continued the first: iteration 1, not 0 again
    assert [n for n in task_names(prefect, first) if "iter" in n] == [  # the demo probes at iteration 0
        f"{s}-iter-0" for s in ("aggregate", "commit", "generate", "probe", "score", "update")
    ]
    assert [n for n in task_names(prefect, second) if "iter" in n] == [
        f"{s}-iter-1" for s in ("aggregate", "commit", "generate", "score", "update")
    ]
    assert s3.fs.exists(f"{s3.name}/runs/sched/iter-000001/MANIFEST.json")


@pytest.mark.slow
def test_overlapping_runs_one_trains_the_other_touches_nothing(prefect, s3, micro_config):
    config = s3_config(s3, micro_config, "race")
    run_uri = f"{s3.url()}/race"
    params = dict(config=config, run_uri=run_uri, advance=1)
    # Two runs of the same deployment at once: the deployment's concurrency limit (1, CANCEL_NEW) lets one in.
    with ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(lambda _: prefect.run_deployment("rlme_train/scheduled", **params), range(2)))
    runs = prefect.wait(*ids)
    assert sorted(r.state.type.value for r in runs) == ["CANCELLED", "COMPLETED"], [(r.name, r.state) for r in runs]
    run = Run.from_url(run_uri)
    assert run.committed() == [0]
    assert gc.plan(run).files == []  # no file of a second attempt anywhere in the run

    # The storage lease, beneath Prefect's limit: while another process (here: this test) trains the run,
    # a flow run touches nothing and ends Cancelled, naming the holder.
    before = sorted(s3.fs.find(f"{s3.name}/runs/race"))
    with Lease(run.store, ttl=300, purpose="another trainer"):
        [busy] = prefect.wait(prefect.run_deployment("rlme_train/scheduled", **params))
        during = sorted(s3.fs.find(f"{s3.name}/runs/race"))
    assert busy.state.is_cancelled(), prefect.logs()
    assert "being trained by pid" in busy.state.message and "another trainer" in busy.state.message
    strip = lambda files: [f for f in files if "/lease/" not in f]  # noqa: E731  (the test's own lease)
    assert strip(during) == strip(before)
    assert not task_names(prefect, str(busy.id))  # no stage task ran
