"""One trainer per run: the lease on local disk and on S3.

Expiry is judged on a clock the test advances by hand (`Clock`), so no test races a deadline: a lease is
expired exactly when the test says so, however slow the machine or the store's retries.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time

import pytest

from rlme_pipeline.storage.lease import Lease, LeaseHeld, LeaseLost, describe
from rlme_pipeline.storage.store import Store

T0 = 1_700_000_000.0


class Clock:
    """Seconds since the epoch that move only when told."""

    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture(params=["local", "s3"])
def run_store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "runs" / "r1"))
    return Store(request.getfixturevalue("s3").url("runs/r1"))


def _current(store: Store) -> dict:
    gens = sorted(n for n in store.ls("lease") if n.endswith(".json"))
    return store.read_json(f"lease/{gens[-1]}")


def test_second_holder_is_refused_with_the_holders_name(run_store):
    clock = Clock()
    with Lease(run_store, ttl=60, clock=clock, flow_run="flow-123") as first:
        assert first.gen == 1
        rec = _current(run_store)
        assert (rec["acquired_at"], rec["renewed_at"], rec["expires_at"], rec["released"]) == (T0, T0, T0 + 60, False)
        clock.advance(59)  # one second before expiry: still held
        with pytest.raises(LeaseHeld, match=r"being trained by pid \d+ on .*flow_run flow-123.*expires in 1s"):
            Lease(run_store, ttl=60, clock=clock).acquire()
    assert _current(run_store)["released"] is True and _current(run_store)["expires_at"] == 0.0
    # released: the next one gets it at once, long before the old expiry, and older generations are removed
    with Lease(run_store, ttl=60, clock=clock) as again:
        assert again.gen == 2
        assert sorted(run_store.ls("lease")) == ["00000002.json"]


def test_expired_lease_is_taken_over_and_the_old_holder_notices(run_store):
    clock = Clock()
    crashed = Lease(run_store, ttl=30, clock=clock).acquire()  # acquired and never renewed: a killed process
    clock.advance(30)  # expires_at == now: no longer live
    taker = Lease(run_store, ttl=60, clock=clock).acquire()
    assert taker.gen == crashed.gen + 1
    crashed.check()  # nothing noticed until its next renewal
    crashed.renew()  # the "crashed" holder wakes up: its renewal sees the newer generation
    with pytest.raises(LeaseLost, match="created by another process"):
        crashed.check()
    crashed.release()  # must not release the taker's lease
    assert _current(run_store)["holder"]["token"] == taker.token and not _current(run_store)["released"]
    with pytest.raises(LeaseHeld):
        Lease(run_store, ttl=60, clock=clock).acquire()
    taker.release()


def test_renewal_moves_the_expiry_forward(run_store):
    clock = Clock()
    holder = Lease(run_store, ttl=60, clock=clock).acquire()
    clock.advance(50)
    holder.renew()
    assert _current(run_store)["expires_at"] == T0 + 110 and _current(run_store)["renewed_at"] == T0 + 50
    clock.advance(50)  # past the first expiry, before the renewed one
    with pytest.raises(LeaseHeld):
        Lease(run_store, ttl=60, clock=clock).acquire()
    holder.check()
    clock.advance(10)  # now == the renewed expiry: free
    assert Lease(run_store, ttl=60, clock=clock).acquire().gen == holder.gen + 1


def test_renewal_keeps_a_live_holder(run_store):
    """The background thread renews on its own: frozen clock far past the first expiry, and the holder
    still holds the run once the thread has written a record dated on that clock."""
    clock = Clock()
    with Lease(run_store, ttl=0.3, clock=clock) as holder:  # the thread renews every ttl/3 = 0.1 s (real time)
        # a daemon, so a process that dies without releasing is not kept alive by it; named for stack dumps
        assert holder._thread.daemon and holder._thread.name == "rlme-lease"
        clock.advance(1000)
        deadline = time.monotonic() + 30  # a wait for an event, not a timing assertion
        while _current(run_store)["expires_at"] != T0 + 1000.3:
            assert time.monotonic() < deadline, "the background thread never renewed the lease"
            time.sleep(0.05)
        with pytest.raises(LeaseHeld):
            Lease(run_store, ttl=60, clock=clock).acquire()
        holder.check()
    assert _current(run_store)["released"] is True


def test_a_dead_local_holder_is_taken_over_before_expiry(tmp_path, caplog):
    clock = Clock()
    gone = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        ).stdout
    )
    here, there = Store(str(tmp_path / "here")), Store(str(tmp_path / "there"))
    dead = Lease(here, ttl=600, clock=clock)
    dead.holder["pid"] = gone  # a process of this host that has exited
    dead.acquire()
    with caplog.at_level(logging.WARNING, logger="rlme_pipeline.storage.lease"):
        assert Lease(here, ttl=60, clock=clock).acquire().gen == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"taking over the lease of pid {gone} on {socket.gethostname()}: that process is gone"
    ]
    # a holder on another host is not judged by this host's process table: it keeps the run until expiry
    remote = Lease(there, ttl=600, clock=clock)
    remote.holder.update(host="elsewhere", pid=gone)
    remote.acquire()
    with pytest.raises(LeaseHeld, match="on elsewhere"):
        Lease(there, ttl=60, clock=clock).acquire()


def test_describe_names_host_pid_and_extras():
    assert (
        describe({"host": "h", "pid": 7, "token": "t", "flow_run": "f", "purpose": "gc"})
        == "pid 7 on h (flow_run f, purpose gc)"
    )
    assert describe({"host": "h", "pid": 7, "token": "t"}) == "pid 7 on h"


def test_the_record_says_who_and_until_when(tmp_path, monkeypatch):
    store, clock = Store(str(tmp_path / "r")), Clock()
    lease = Lease(store, ttl=45, clock=clock, flow_run="f1", purpose=None).acquire()  # None extras are left out
    rec = _current(store)
    assert set(rec["holder"]) == {"host", "pid", "token", "flow_run"} and rec["holder"]["token"] == lease.token
    assert rec["ttl_s"] == 45 and rec["holder"]["flow_run"] == "f1"
    monkeypatch.setenv("RLME_LEASE_TTL", "7.5")
    assert Lease(store).ttl == 7.5  # the default TTL comes from the environment when set
    monkeypatch.delenv("RLME_LEASE_TTL")
    assert Lease(store).ttl == 120.0


def test_an_unreadable_or_foreign_generation_does_not_block_the_run(tmp_path):
    store, clock = Store(str(tmp_path / "r")), Clock()
    store.write_bytes("lease/00000003.json", b'{"holder": {"pid"')  # torn write of a crashed holder
    for name in ("notes.txt", "abc.json", "12345x.json", "1x.json"):  # not generations
        store.write_bytes(f"lease/{name}", b"{}")
    lease = Lease(store, ttl=60, clock=clock).acquire()
    assert lease.gen == 4
    assert sorted(store.ls("lease")) == ["00000004.json", "12345x.json", "1x.json", "abc.json", "notes.txt"]


def test_records_of_other_writers_are_judged_by_their_fields(tmp_path):
    store, clock = Store(str(tmp_path / "r")), Clock()
    store.write_bytes("lease/00000001.json", b"{}")  # no holder, no expiry: not live
    assert Lease(store, ttl=60, clock=clock).acquire().gen == 2
    other = {"holder": {"host": "elsewhere", "pid": 1, "token": "t"}, "expires_at": T0 + 1000}
    store.write_json("lease/00000003.json", {**other, "released": True})  # released, whatever its expiry says
    assert Lease(store, ttl=60, clock=clock).acquire().gen == 4
    store.write_json("lease/00000005.json", {**other, "released": False})
    with pytest.raises(LeaseHeld, match="pid 1 on elsewhere"):
        Lease(store, ttl=60, clock=clock).acquire()
    store.write_json("lease/00000006.json", {"expires_at": T0 + 1000})  # live, but names no holder
    with pytest.raises(LeaseHeld, match="being trained by pid None on None; its lease expires in 1000s"):
        Lease(store, ttl=60, clock=clock).acquire()


def test_releasing_a_lease_never_acquired_does_nothing(tmp_path):
    store = Store(str(tmp_path / "r"))
    Lease(store, ttl=60).release()
    assert not store.exists("lease")


def test_a_create_whose_reply_was_lost_is_recognised_as_ours(tmp_path):
    store, clock = Store(str(tmp_path / "r")), Clock()
    lease = Lease(store, ttl=60, clock=clock)
    lease._acquired_at = clock()
    assert store.create_json("lease/00000001.json", lease._record())  # landed; the caller never heard back
    assert lease.acquire().gen == 1  # a retry finds its own token instead of refusing itself


def test_contention_gives_up_with_a_clear_error(tmp_path, monkeypatch):
    store, clock = Store(str(tmp_path / "r")), Clock()
    tries = []
    monkeypatch.setattr(store, "create_json", lambda rel, obj: tries.append(rel) and False)  # every create loses
    with pytest.raises(LeaseHeld, match=r"^run .* could not acquire the lease \(contended\)$"):
        Lease(store, ttl=60, clock=clock).acquire()
    assert tries == ["lease/00000001.json"] * 5  # five rounds, each aiming at the next generation


def test_renewal_runs_every_third_of_the_ttl(tmp_path):
    """The cadence that keeps a live holder's lease from expiring between renewals: ttl/3."""
    waits = []

    class Recording(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(timeout)

    lease = Lease(Store(str(tmp_path / "r")), ttl=0.375, clock=Clock())  # ttl/3 = 0.125 exactly
    lease._stop = Recording()
    with lease:
        deadline = time.monotonic() + 30
        while len(waits) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert set(waits) == {0.125}


def test_a_local_pid_owned_by_another_user_is_alive(tmp_path, monkeypatch):
    import rlme_pipeline.storage.lease as lease_module

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(lease_module.os, "kill", kill)
    assert not lease_module.dead_here({"host": lease_module.socket.gethostname(), "pid": 12345})
    signals = []
    monkeypatch.setattr(lease_module.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    assert not lease_module.dead_here({"host": lease_module.socket.gethostname(), "pid": 12345})
    assert signals == [(12345, 0)]  # signal 0: a probe; any other would reach the live holder (1: SIGHUP)
    assert not lease_module.dead_here({"host": lease_module.socket.gethostname(), "pid": "12345"})  # not a pid


def test_a_lost_lease_is_neither_renewed_nor_released(tmp_path):
    store, clock = Store(str(tmp_path / "r")), Clock()
    old = Lease(store, ttl=10, clock=clock).acquire()
    clock.advance(11)
    new = Lease(store, ttl=60, clock=clock).acquire()
    old.renew()  # notices
    before = store.read_bytes(f"lease/{new.gen:08d}.json")
    stale = store.read_bytes(f"lease/{old.gen:08d}.json")
    old.renew()  # lost: writes nothing more
    old.release()
    assert store.read_bytes(f"lease/{new.gen:08d}.json") == before
    assert store.read_bytes(f"lease/{old.gen:08d}.json") == stale  # not even "released" on its own generation
    assert _current(store)["holder"]["token"] == new.token and not _current(store)["released"]


def test_a_failed_renewal_is_a_warning_and_the_next_one_retries(tmp_path, caplog):
    store, clock = Store(str(tmp_path / "r")), Clock()
    calls = []
    with Lease(store, ttl=0.3, clock=clock) as lease:
        real = lease.renew

        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("store unreachable")
            real()

        lease.renew = flaky
        clock.advance(100)
        deadline = time.monotonic() + 30
        while _current(store)["expires_at"] != T0 + 100.3:
            assert time.monotonic() < deadline, "no renewal after the failed one"
            time.sleep(0.05)
    assert f"lease renewal for {store.url} failed: ConnectionError: store unreachable" in [
        r.getMessage() for r in caplog.records
    ]
