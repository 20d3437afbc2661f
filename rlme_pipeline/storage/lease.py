"""One trainer per run: a lease object in the run's own store, with an expiry that a live holder renews.

    {run}/lease/00000007.json   {"holder": {"host", "pid", "token", ...}, "expires_at", "released"}

Generations make acquisition a single exclusive create, which every store we support offers (local
link(2), S3 If-None-Match: *): to acquire, read the newest generation; if it is live and not ours, fail
naming its holder; otherwise create generation n+1. Two contenders for n+1 cannot both win. A holder
renews its own generation from a background thread and loses the lease if a newer generation appears
(it was presumed dead after expiry). The lease coordinates; it is not what keeps data safe: data files
are write-once under attempt-unique names and MANIFEST.json is created exclusively, so even a holder that
was paused past its expiry cannot damage what another process committed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from rlme_pipeline.storage.store import Store

log = logging.getLogger(__name__)
DIR = "lease"
DEFAULT_TTL = 120.0  # renewed every ttl/3; a preempted machine's lease frees up this long after it died


class LeaseHeld(RuntimeError):
    pass


class LeaseLost(RuntimeError):
    pass


def ttl_default() -> float:
    return float(os.environ.get("RLME_LEASE_TTL", DEFAULT_TTL))


def dead_here(holder: dict) -> bool:
    """A holder on this host whose process no longer exists (killed, crashed): no need to wait for expiry."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe(holder: dict) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in sorted(holder.items()) if k not in ("host", "pid", "token"))
    return f"pid {holder.get('pid')} on {holder.get('host')}" + (f" ({extra})" if extra else "")


class Lease:
    """`with Lease(run.store, purpose="train"):` holds the run for the block, renewing in the background.

    `clock` (seconds since the epoch, default time.time) dates the records and judges expiry; tests pass
    one they advance by hand, so expiry and renewal are checked without sleeping against a deadline."""

    def __init__(self, store: Store, ttl: float | None = None, clock: Callable[[], float] | None = None, **holder_info):
        self.store = store
        self.ttl = ttl or ttl_default()
        self.clock = clock or time.time
        self.token = uuid.uuid4().hex
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            **{k: v for k, v in holder_info.items() if v is not None},
        }
        self.gen: int | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the objects -------------------------------------------------------------------------------
    def _rel(self, gen: int) -> str:
        return f"{DIR}/{gen:08d}.json"

    def _gens(self) -> list[int]:
        return sorted(int(n[:-5]) for n in self.store.ls(DIR) if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, gen: int) -> dict | None:
        try:
            return self.store.read_json(self._rel(gen))
        except (FileNotFoundError, ValueError):
            return None  # unreadable: treated as expired rather than blocking the run forever

    def _record(self, released: bool = False) -> dict:
        now = self.clock()
        return {
            "holder": self.holder,
            "acquired_at": self._acquired_at,
            "renewed_at": now,
            "expires_at": 0.0 if released else now + self.ttl,
            "released": released,
            "ttl_s": self.ttl,
        }

    # --- protocol ----------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        self._acquired_at = self.clock()
        for _ in range(5):
            gens = self._gens()
            if gens and (cur := self._read(gens[-1])) is not None:
                live = not cur.get("released") and cur.get("expires_at", 0) > self.clock()
                if live and dead_here(cur.get("holder", {})):
                    log.warning("taking over the lease of %s: that process is gone", describe(cur["holder"]))
                    live = False
                if cur.get("holder", {}).get("token") == self.token:
                    self.gen = gens[-1]  # our own create landed although its reply was lost
                    break
                if live:
                    left = cur["expires_at"] - self.clock()
                    raise LeaseHeld(
                        f"run {self.store.url} is being trained by {describe(cur.get('holder', {}))}; its lease expires "
                        f"in {left:.0f}s unless renewed. Wait for it to finish, or stop it; a crashed holder's "
                        f"lease can be taken over after expiry (lease/{gens[-1]:08d}.json)."
                    )
            n = gens[-1] + 1 if gens else 1
            if self.store.create_json(self._rel(n), self._record()):
                self.gen = n
                break
        else:
            raise LeaseHeld(f"run {self.store.url}: could not acquire the lease (contended)")
        for old in self._gens():  # older generations are history nobody reads
            if old < self.gen:
                try:
                    self.store.rm(self._rel(old))
                except Exception:  # best effort: a leftover generation is harmless
                    pass
        return self

    def renew(self) -> None:
        if self._lost:
            return
        self.store.write_json(self._rel(self.gen), self._record())
        newer = [g for g in self._gens() if g > self.gen]
        if newer:
            self._lost = f"lease/{newer[-1]:08d}.json was created by another process after ours expired"

    def check(self) -> None:
        """Raise if the lease was lost; call between units of work."""
        if self._lost:
            raise LeaseLost(f"run {self.store.url}: lost the lease ({self._lost}); stopping before writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.gen is not None and not self._lost and not [g for g in self._gens() if g > self.gen]:
            self.store.write_json(self._rel(self.gen), self._record(released=True))

    # --- background renewal ------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as e:  # a store hiccup; the next round tries again well before expiry
                log.warning("lease renewal for %s failed: %s: %s", self.store.url, type(e).__name__, e)

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="rlme-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
