"""Per-iteration Prefect reports sent from a background thread: a slow first report neither holds up the
caller, nor lets later reports overtake it, nor is lost when the flow ends."""

from __future__ import annotations

import logging
import threading

from rlme_flows.train import background_reports


def test_a_slow_first_report_keeps_the_order_and_finishes_before_the_flow_ends():
    done: list[int] = []
    release = threading.Event()

    def report(n: int) -> None:
        if n == 0:
            release.wait(timeout=10)  # slow: in progress until the caller has sent every report
        done.append(n)

    with background_reports(logging.getLogger("rlme-test-reports")) as send:
        for n in range(4):
            send(report, n=n)
        # the caller got here while report 0 is still running (a synchronous send would have waited the
        # full timeout and appended 0), and nothing queued behind it has overtaken it
        assert done == []
        release.set()
    assert done == [0, 1, 2, 3]  # iteration order, every report created before the block ends
