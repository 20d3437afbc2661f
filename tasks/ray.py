"""Re-score shards on a Ray cluster, through Prefect's Ray task runner (the `ray` extra: prefect-ray).

    rlme rescore RUN --name v2 --questions q.yaml --ray ray://head:10001 [--ray-num-gpus 1]

The flow picks the task runner at run time: its shard fan-out is a subflow run with
`.with_options(task_runner=RayTaskRunner(...))` when an address is given, so a deployment chooses Ray by a
parameter. Each shard is one Ray task asking for `num_cpus` / `num_gpus` (prefect_ray's `remote_options`).
A Ray task whose worker process dies is resubmitted by Ray elsewhere (`max_retries`); a shard is a
write-once `run.Unit`, so a repeated shard never replaces or duplicates a committed one.

Addresses: `ray://host:10001` (Ray client), `host:6379` (the head's GCS: the driver joins the cluster),
`auto` (the cluster of RAY_ADDRESS or the one `ray start` left on this machine), `local` (a temporary
cluster inside this process, for a single machine).
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

FIX = (
    "give the head's address as ray://HOST:10001 (Ray client) or HOST:6379 (GCS), 'auto' for the cluster "
    "`ray start` runs on this machine, or 'local' for a temporary one in this process"
)
# Ray resubmits a task whose worker process died (system failures only; an exception in the shard is
# Prefect's to retry, with the task's own retries).
MAX_RETRIES = 3


class RayShards(BaseModel):
    """Where and with what resources the shards run (flow parameters `ray`, `ray_num_cpus`, `ray_num_gpus`)."""

    address: str
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    def remote_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_retries": MAX_RETRIES}

    def task_runner(self):
        """prefect-ray's runner: 'local' starts a cluster in this process, 'auto' must find a running one."""
        from prefect_ray import RayTaskRunner

        init = {"include_dashboard": False} if self.address == "local" else {}
        if self.address == "auto":  # RayTaskRunner(address="auto") would start a new local cluster instead
            return RayTaskRunner(init_kwargs={"address": "auto"})
        return RayTaskRunner(address=None if self.address == "local" else self.address, init_kwargs=init)


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of an explicit address; None for 'auto' and 'local'. A malformed one is a ValueError."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "ray" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"--ray {address!r}: not a Ray address; {FIX}")
    return parts.hostname, port


def check_address(address: str, timeout: float = 5.0) -> None:
    """One line naming --ray and the fix when no cluster can answer there: checked before any shard starts
    (Ray itself would retry a dead address for a minute, then print pages). Also checks the extra is installed."""
    try:
        import prefect_ray  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise ValueError(f"--ray {address}: Ray is not installed; pip install 'rlme[ray]'") from None
    hp = host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise ValueError(f"--ray {address}: no Ray cluster answers at {hp[0]}:{hp[1]} ({reason}); {FIX}") from None


def unreachable(address: str, e: Exception) -> ValueError:
    """Ray's own connection error (e.g. 'auto' with no cluster running), as one line."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ValueError(f"--ray {address}: cannot join the Ray cluster ({first}); {FIX}")
