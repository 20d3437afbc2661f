"""SIGTERM during `train` (a preempted node, a Kubernetes eviction, a cancelled Prefect flow run): finish the
step in progress, write the full training state if that step is an update, and stop.

    with Sigterm(logger) as sigterm:    outermost: the lease is released and the backends closed before
        ... sigterm.check() ...         the signal goes on to the handler that was there before (the
                                        default one ends the process with status -15, as without rlme)

Why: with `checkpoint.full_every` N > 1, a process killed between full states makes the next one replay up
to N - 1 updates. Asked to stop, rlme instead writes the full state with the update that is running (or
stops before the next step when none is); the run then resumes without a replay. `check()` raises
`Stopped` between steps; the loop never starts a step after the signal. Only the main thread can receive
signals: elsewhere (a flow run in a worker thread) nothing is installed and SIGTERM acts as it did.
"""

from __future__ import annotations

import logging
import os
import signal
import threading


class Stopped(Exception):
    """Raised between steps after SIGTERM; `Sigterm` turns it back into the signal once everything is closed."""


class Sigterm:
    def __init__(self, logger: logging.Logger | logging.LoggerAdapter):
        self.logger, self.requested, self.installed, self._previous = logger, False, False, None

    def __enter__(self) -> Sigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.logger.warning("SIGTERM: finishing the step in progress (an update writes the full training state)")
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise Stopped

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.installed:
            return False
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        if not self.requested:
            return False
        self.logger.warning("stopped on SIGTERM; `rlme train` resumes the run where it stopped")
        os.kill(os.getpid(), signal.SIGTERM)  # now the handler that was there before it
        return exc_type is Stopped
