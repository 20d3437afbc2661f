"""The Prefect settings the `rlme` commands run their flows under."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_prefect() -> Iterator[None]:
    """Quiet, self-contained Prefect for a command-line run.

    With no PREFECT_API_URL, Prefect serves the flow from a temporary local server that needs no setup
    (analytics off avoids noisy "database is locked" tracebacks from its background services). That
    server exits with this process, so flow-run heartbeats have no reader: they exist for a persistent
    server to mark a deployment's crashed runs. They also cost up to a second per flow run, because
    Prefect (3.8, 3.9) joins the heartbeat thread at the end of the run while it sleeps in 1 s steps.
    So they are off here and stay on wherever an API URL is set (workers, `prefect server`, Cloud).
    Enter this before importing Prefect: it reads its environment then."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
