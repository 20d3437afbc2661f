"""Orchestration overhead: the Prefect flow `rlme_train` versus calling the same stage functions directly.

    PYTHONPATH=. python -m benchmarks.orchestration [--config configs/demo.yaml] [--iterations 3] [--repeats 2] [--tiny]

Each case is a fresh subprocess with a fresh storage dir and PREFECT_HOME. "direct" does what the flow
does without Prefect: load the config, `preflight`, `rlme_pipeline.jobs.train.train(cfg, run)`. "prefect"
runs under the Prefect settings `rlme train` uses (rlme_flows.local_prefect): an empty flow first (it starts
Prefect's temporary local server; reported as startup), then `rlme_flows.train.rlme_train` for the same
config. Per-iteration time is the wall time of the training call divided by the iterations; the first
iteration (model loads) is included in both. Cases alternate direct/prefect; overhead = median over
pairs of prefect/direct - 1.
Target: <= 10% of an iteration of the demo config.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks._common import ROOT, emit, machine, median, run_case, spread, table


def case(c: dict) -> dict:
    seconds, cpu, startup = _direct(c) if c["mode"] == "direct" else _prefect(c)
    n = c["iterations"]
    return {
        "seconds": seconds,
        "per_iteration": seconds / n,
        "cpu_per_iteration": cpu / n,
        "startup": startup,
        "steady": _steady(c),
    }


def _steady(c: dict) -> float | None:
    """Median time between consecutive commits (iteration 1 on: no model loads, no flow start or end),
    read from the mtimes of the manifests in the local run directory."""
    from rlme_pipeline.config import load_config
    from rlme_pipeline.storage.run import MANIFEST, Run

    run = Run.for_config(load_config(c["config"]).with_overrides(storage=c["storage"]))
    t = [os.stat(os.path.join(run.url, run.rel(i, MANIFEST))).st_mtime for i in range(c["iterations"])]
    return median([b - a for a, b in zip(t, t[1:])]) if len(t) > 1 else None


def _direct(c: dict) -> tuple[float, float, float]:
    from rlme_pipeline.config import load_config
    from rlme_pipeline.jobs.preflight import preflight
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.storage.run import Run

    t0, c0 = time.perf_counter(), time.process_time()
    # what rlme_train does, minus Prefect: load the config, check every input, train
    cfg = load_config(c["config"]).with_overrides(storage=c["storage"], iterations=c["iterations"])
    run = Run.for_config(cfg)
    preflight(cfg, run.root)
    train(cfg, run)
    return time.perf_counter() - t0, time.process_time() - c0, 0.0


def _prefect(c: dict) -> tuple[float, float, float]:
    from rlme_flows.local_prefect import local_prefect

    t0 = time.perf_counter()
    with local_prefect():  # the settings `rlme train` runs its flow under
        from prefect import flow
        from rlme_flows.train import rlme_train

        @flow
        def noop():
            return 1

        noop()  # starts the temporary server, which then serves the training flow too
        startup = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        rlme_train(c["config"], iterations=c["iterations"], storage=c["storage"])
        return time.perf_counter() - t0, time.process_time() - c0, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: 1 iteration, one repeat")
    a = ap.parse_args()
    if a.case:
        import json

        emit(case(json.loads(a.case)))
        return
    if a.tiny:
        a.iterations, a.repeats = 1, 1
    res: dict[str, list[dict]] = {"direct": [], "prefect": []}
    with tempfile.TemporaryDirectory(prefix="rlme-bench-orch-") as tmp:
        for r in range(a.repeats):
            for mode in ("direct", "prefect") if r % 2 == 0 else ("prefect", "direct"):
                home = os.path.join(tmp, f"prefect-{mode}-{r}")
                # PREFECT_API_URL unset (not empty: an empty URL silently stops event delivery) = the temporary server
                env = {
                    "PREFECT_HOME": home,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_URL": None,
                    "PREFECT_LOGGING_LEVEL": "WARNING",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                }
                res[mode].append(
                    run_case(
                        "benchmarks.orchestration",
                        {
                            "mode": mode,
                            "config": a.config,
                            "iterations": a.iterations,
                            "storage": os.path.join(tmp, f"runs-{mode}-{r}"),
                        },
                        env=env,
                    )
                )

    def col(key: str) -> tuple[float | None, float | None, str]:
        """direct median, prefect median, overhead (median over pairs of prefect/direct - 1)"""
        d, p = [x[key] for x in res["direct"]], [x[key] for x in res["prefect"]]
        if None in d + p:
            return None, None, "-"
        return median(d), median(p), f"{100 * median([pp / dd - 1 for pp, dd in zip(p, d)]):+.1f}%"

    (wd, wp, wo), (sd, sp, so), (cd, cp, co) = col("per_iteration"), col("steady"), col("cpu_per_iteration")
    rows = [
        ["direct (runner.train)", wd, "-", sd, "-", cd, "-", "-", spread([x["per_iteration"] for x in res["direct"]])],
        [
            "prefect flow (rlme_train)",
            wp,
            wo,
            sp,
            so,
            cp,
            co,
            median([x["startup"] for x in res["prefect"]]),
            spread([x["per_iteration"] for x in res["prefect"]]),
        ],
    ]
    print(
        f"orchestration: {os.path.relpath(a.config, ROOT)}, {a.iterations} iterations per run, fresh subprocess and "
        f"storage per case, alternating, median of {a.repeats} pairs"
    )
    print(f"machine: {machine()}")
    print(
        table(
            [
                "mode",
                "wall s / iteration",
                "wall overhead",
                "steady s / iteration",
                "steady overhead",
                "CPU s / iteration",
                "CPU overhead",
                "server startup s (once)",
                "spread",
            ],
            rows,
        )
    )
    print(
        "overheads: median over pairs of prefect/direct - 1. steady: median time between consecutive commits from "
        "iteration 1 on (no model loads, no flow start or end)"
    )


if __name__ == "__main__":
    main()
