"""One trainer per run: the lease on local disk and on S3."""

from __future__ import annotations

import time

import pytest

from rlme_pipeline.lease import Lease, LeaseHeld, LeaseLost
from rlme_pipeline.storage import Store


@pytest.fixture(params=["local", "s3"])
def run_store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "runs" / "r1"))
    return Store(request.getfixturevalue("s3").url("runs/r1"))


def test_second_holder_is_refused_with_the_holders_name(run_store):
    with Lease(run_store, ttl=60, flow_run="flow-123"):
        with pytest.raises(LeaseHeld, match=r"being trained by pid \d+ on .*flow_run flow-123"):
            Lease(run_store, ttl=60).acquire()
    # released: the next one gets it at once
    with Lease(run_store, ttl=60) as again:
        assert again.gen == 2


def test_expired_lease_is_taken_over_and_the_old_holder_notices(run_store):
    crashed = Lease(run_store, ttl=0.5).acquire()  # acquired and never renewed: a killed process
    time.sleep(0.6)
    taker = Lease(run_store, ttl=60).acquire()
    assert taker.gen == crashed.gen + 1
    crashed.renew()  # the "crashed" holder wakes up: its renewal sees the newer generation
    with pytest.raises(LeaseLost, match="created by another process"):
        crashed.check()
    crashed.release()  # must not release the taker's lease
    with pytest.raises(LeaseHeld):
        Lease(run_store, ttl=60).acquire()
    taker.release()


def test_renewal_keeps_a_live_holder(run_store):
    with Lease(run_store, ttl=1.0) as holder:
        time.sleep(2.5)  # several TTLs: the background thread renews every ttl/3
        with pytest.raises(LeaseHeld):
            Lease(run_store, ttl=60).acquire()
        holder.check()
