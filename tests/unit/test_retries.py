"""Which failures the stage and re-score tasks retry (tasks/retries.py): transient faults only.

The failures are made for real where this machine can make them (a refused connection, a store whose
retries run out, a path under a file, a bad config, a lease another process holds); a CUDA out-of-memory
error, a throttled S3 endpoint and a server's 503 cannot be caused on a CPU machine without a cloud, so
those are the libraries' own exception types, built directly.
"""

from __future__ import annotations

import socket

import aiohttp
import botocore.exceptions
import httpx
import torch
from prefect.states import Failed
from rlme_tasks.retries import retry_if_transient, transient
from rlme_tasks.steps import as_tasks

from rlme_pipeline.backends import BackendConfigError, BackendError
from rlme_pipeline.backends.server import ManagedServer
from rlme_pipeline.config import ConfigError, load_config
from rlme_pipeline.jobs.oom import StageOutOfMemory
from rlme_pipeline.storage.lease import Lease, LeaseHeld
from rlme_pipeline.storage.run import CorruptRun, Run
from rlme_pipeline.storage.store import StorageError, Store, retrying
from tests.conftest import DEMO


def caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the test classifies whatever it raised
        return e
    raise AssertionError(f"{fn} raised nothing")


def refused_connection():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=5)


def test_transient_faults_are_retried(tmp_path):
    assert transient(caught(refused_connection))  # ConnectionRefusedError
    assert transient(caught(lambda: retrying("read x", refused_connection, attempts=2, base_delay=0)))  # StorageError
    assert transient(caught(lambda: httpx.get("http://127.0.0.1:9/v1/models", timeout=5)))  # httpx.ConnectError
    assert transient(TimeoutError("task run exceeded its stage_timeout_s"))
    assert transient(BackendError("vLLM server died and its 1 restart(s) are spent"))
    assert transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://minio:9000"))
    assert transient(aiohttp.ServerDisconnectedError())
    assert transient(aiohttp.ClientResponseError(None, (), status=503))


def test_deterministic_failures_are_not(tmp_path):
    bad_config = caught(lambda: load_config(DEMO).with_overrides(stage_timeout_s={"updat": 10}))
    assert isinstance(bad_config, ConfigError) and not transient(bad_config)
    (tmp_path / "a-file").write_text("")
    under_a_file = Store(str(tmp_path / "a-file" / "runs"))
    permanent = caught(lambda: under_a_file.write_bytes("x.bin", b"x"))  # NotADirectoryError, raised from None
    assert isinstance(permanent, StorageError) and not transient(permanent)
    assert not transient(caught(lambda: Store(str(tmp_path)).read_bytes("missing.bin")))  # FileNotFoundError
    no_interpreter = ManagedServer(str(tmp_path / "no-python"), "tiny")
    setup = caught(no_interpreter.start)
    assert isinstance(setup, BackendConfigError) and isinstance(setup, BackendError) and not transient(setup)
    store = Store(str(tmp_path / "leased"))
    with Lease(store, purpose="train"):
        held = caught(Lease(store, purpose="train").acquire)
    assert isinstance(held, LeaseHeld) and not transient(held)
    assert not transient(caught(lambda: Run.from_url(str(tmp_path / "runs" / "none")).meta()))  # NoRun
    assert not transient(CorruptRun("iter-000003/MANIFEST.json is not a valid manifest"))
    assert not transient(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    # what a stage turns it into (oom.py): the same fault, named with the knobs to turn
    assert not transient(StageOutOfMemory("update of iteration 3 ran out of GPU memory"))
    assert not transient(caught(lambda: torch.empty(2**50, dtype=torch.uint8)))  # CPU: RuntimeError, not OOM type
    assert not transient(KeyError("reward"))  # a bug is not retried either


def test_prefect_condition_reads_the_failed_state():
    refused = caught(refused_connection)
    assert retry_if_transient(None, None, Failed(data=refused))
    assert not retry_if_transient(None, None, Failed(data=ConfigError("optimizer.lr: must be > 0")))
    assert not retry_if_transient(None, None, Failed(data=None))


def test_every_step_task_retries_transient_faults_only():
    """A job's steps (tasks/steps.py) carry the one policy; the fanned-out pieces are checked on a real
    Prefect server (tests/e2e/test_flow_events.py)."""
    step = as_tasks({"update": 60})("update", lambda iteration: iteration)
    assert step.retries == 2 and step.retry_condition_fn is retry_if_transient and step.timeout_seconds == 60
