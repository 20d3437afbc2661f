"""A killed `rlme train` takes its temporary Prefect server with it.

Without PREFECT_API_URL the trainer runs Prefect's temporary server (uvicorn, ~210 MB, a port) as a child
process. Prefect stops it at interpreter exit, which SIGKILL skips: the server was re-parented to init and
ran forever. Linux only (/proc, and the parent-death signal the fix uses).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc and PR_SET_PDEATHSIG")

SERVER_APP = "prefect.server.api.server:create_app"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child that nobody reaped yet holds no memory and no port)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _server_of(parent: int) -> tuple[int, str] | None:
    """(pid, API URL) of the Prefect server that `parent` started, once it answers its health check."""
    for child in Path(f"/proc/{parent}/task").glob("*/children"):
        for pid in map(int, child.read_text().split()):
            cmd = _cmdline(pid)
            if SERVER_APP in cmd:
                url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}/api"
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        return pid, url
                except httpx.HTTPError:
                    return None
    return None


def test_sigkill_of_the_trainer_leaves_no_prefect_server(micro_config, tmp_path):
    config = micro_config(str(tmp_path / "runs"), iterations=200)  # still training when it is killed
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect"))
    trainer = subprocess.Popen(
        [sys.executable, "-m", "rlme_flows.cli", "train", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        deadline = time.monotonic() + 180
        while server is None and time.monotonic() < deadline and trainer.poll() is None:
            time.sleep(0.5)
            server = _server_of(trainer.pid)
        assert server is not None, f"no Prefect server came up under the trainer (exit {trainer.poll()})"
        pid, url = server

        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(pid), f"the Prefect server {pid} outlived its killed trainer"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        if server is not None and _running(server[0]):
            os.kill(server[0], signal.SIGKILL)  # the leaked server of a failed run: started by this test
