"""Which failed task runs Prefect retries: transient faults only (network, storage, a backend's server).

A retry runs the step again from what storage holds. That helps only when the fault lay outside the code,
the config and the data: a dropped connection, a throttled or unavailable store, a vLLM server that died
or timed out. A config or validation error, missing storage credentials, a damaged run, a lease another
process holds or an out-of-memory error fails the same way every time; retrying it only delays the failure (12 s per task)
and buries its one clear message under repeats.
"""

from __future__ import annotations

import httpx
import torch

from rlme_pipeline.backends import BackendError
from rlme_pipeline.config import ConfigError
from rlme_pipeline.jobs.oom import StageOutOfMemory
from rlme_pipeline.storage.lease import LeaseHeld, LeaseLost
from rlme_pipeline.storage.run import CorruptRun
from rlme_pipeline.storage.store import CREDENTIALS, PERMANENT, TRANSIENT, StorageError

# Checked first: some are subclasses of transient types (FileNotFoundError is an OSError; botocore's
# NoCredentialsError is a BotoCoreError: the store's PERMANENT holds it), and a config problem that a
# backend reports is a ConfigError (backends.BackendConfigError) before it is a BackendError.
NEVER = (
    *PERMANENT,
    *CREDENTIALS,
    ConfigError,
    CorruptRun,
    LeaseHeld,
    LeaseLost,
    MemoryError,
    torch.OutOfMemoryError,
    StageOutOfMemory,
)
# Connection-level faults (the store's own list: OSError, TimeoutError, botocore, aiohttp), the HTTP
# client's transport faults, and a backend that failed after its own retries. A stage that runs past its
# `run.stage_timeout_s` raises a TimeoutError (Prefect's TaskRunTimeoutError) and is retried too.
TRANSIENT_TYPES = (*TRANSIENT, httpx.TransportError, BackendError)


def transient(exc: BaseException) -> bool:
    """Would running the step again plausibly succeed? Unknown exceptions are not transient."""
    if isinstance(exc, NEVER):
        return False
    if isinstance(exc, StorageError):
        # The store raises it for a permanent fault (no bucket, access denied: raised from None) and for a
        # transient one whose retries ran out (raised from that fault).
        return exc.__cause__ is not None and transient(exc.__cause__)
    return isinstance(exc, TRANSIENT_TYPES)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: called with the failed state, whose data is the exception."""
    return isinstance(state.data, BaseException) and transient(state.data)


# The retry policy of every task that does the work of a stage or a shard.
RETRY = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_if_transient}
