"""The Prefect settings the `rlme` commands run their flows under."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_prefect(shared: bool = False) -> Iterator[None]:
    """Quiet, self-contained Prefect for a command-line run.

    With no PREFECT_API_URL, Prefect serves the flow from a temporary local server that needs no setup
    (analytics off avoids noisy "database is locked" tracebacks from its background services). That
    server exits with this process, so flow-run heartbeats have no reader: they exist for a persistent
    server to mark a deployment's crashed runs. They also cost up to a second per flow run, because
    Prefect (3.8, 3.9) joins the heartbeat thread at the end of the run while it sleeps in 1 s steps.
    So they are off here and stay on wherever an API URL is set (workers, `prefect server`, Cloud).
    Enter this before importing Prefect: it reads its environment then.

    shared=True (tasks run in other processes: Ray workers): the temporary server is started here and its
    URL put in the settings that Prefect sends with each task, so every worker reports to it. Left to
    Prefect, each worker process would start a temporary server of its own. Its URL is on 127.0.0.1: a
    cluster on other machines needs PREFECT_API_URL set to a server they reach (docs/scale.md)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    if get_current_settings().api.url:
        yield
        return
    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if shared:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the instance Prefect itself would start; it stops at exit, as Prefect's does
        server.start(timeout=120)  # as PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS above: a loaded machine is slow
        updates[PREFECT_API_URL] = server.api_url
    with temporary_settings(updates=updates):
        yield
