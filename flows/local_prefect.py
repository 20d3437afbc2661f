"""The Prefect settings the `rlme` commands run their flows under, and the temporary server they use."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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

    The temporary server is started here (`start_server`), so that it dies with this process even when
    the process is killed (SIGKILL runs no atexit handler; Prefect's own start would leave it running).

    shared=True (tasks run in other processes: Ray workers): the server's URL is put in the settings that
    Prefect sends with each task, so every worker reports to it. Left to Prefect, each worker process
    would start a temporary server of its own. Its URL is on 127.0.0.1: a cluster on other machines needs
    PREFECT_API_URL set to a server they reach (docs/scale.md)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    settings = get_current_settings()
    if settings.api.url:
        yield
        return
    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if settings.server.ephemeral.enabled:
        server = start_server(timeout=120)  # as PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS above
        if shared:
            updates[PREFECT_API_URL] = server.api_url
    with temporary_settings(updates=updates):
        yield


def start_server(timeout: int = 120):
    """Prefect's temporary server, the instance Prefect itself uses when no API URL is set (its
    `SubprocessASGIServer()`), started now from this thread with a parent-death signal: Prefect stops it
    at interpreter exit, and the kernel stops it when this process dies without one (SIGKILL, a crash).
    Prefect's start is kept (port choice, health wait, atexit stop); only its Popen gains the signal."""
    import prefect.server.api.server as prefect_server

    server = prefect_server.SubprocessASGIServer()
    preexec = die_with_parent()
    if server.running or preexec is None or not hasattr(prefect_server, "subprocess"):
        server.start(timeout=timeout)  # started before, or no parent-death signal here (not Linux)
        return server
    run = server._run_uvicorn_command

    def run_dying_with_parent():
        prefect_server.subprocess = _PopenWith(preexec)
        try:
            return run()
        finally:
            prefect_server.subprocess = subprocess

    server._run_uvicorn_command = run_dying_with_parent  # also used by start()'s retry on a taken port
    server.start(timeout=timeout)
    return server


class _PopenWith:
    """The `subprocess` module as Prefect's server module sees it while it starts uvicorn: every Popen
    runs `preexec_fn` in the child before exec."""

    def __init__(self, preexec: Callable[[], None]):
        self._preexec = preexec

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    def Popen(self, *args, **kwargs):  # noqa: N802 - the name Prefect calls
        return subprocess.Popen(*args, preexec_fn=self._preexec, **kwargs)


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies (Linux prctl
    PR_SET_PDEATHSIG), or None where there is none. The signal follows the thread that forks the child,
    so only the main thread, which lives as long as the process, may use it."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # this process died before the prctl: nobody would send the signal
            os._exit(1)

    return preexec
