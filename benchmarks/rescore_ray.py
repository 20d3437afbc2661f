"""Re-score throughput on a local Ray cluster of 2 workers vs 1, side by side (issue 17: target >= 1.6x).

    PYTHONPATH=. python -m benchmarks.rescore_ray [--n 10000] [--shard-rows 500] [--repeats 1] [--tiny]

The run: the demo trained one iteration on the tiny models, then its rollouts replicated through the Run
API into one committed iteration of N rollouts (benchmarks.rescore_memory.build: new prompt ids, the
same texts; generating 10,000 rollouts would take far longer than scoring them). Each case is the real
`rlme_rescore` flow with `ray=ADDRESS` (one question, the run's two evaluators), on a fresh local head of 1
or 2 CPUs (each shard asks for 1 CPU, so 1 or 2 worker processes, at nice 0 like everything else on the
machine rather than Ray's default 15), cases alternating 1, 2, 1, 2, ... The
seconds are the whole flow: plan, the shards on Ray (workers' start-up and model loads included), and the
final merge. Every case must commit the same score set (same file hashes), or the script fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import local_ray_head, machine, median, table

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray's import: the driver on 127.0.0.1 too


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def case(run_dir: Path, copy: Path, questions: str, shard_rows: int, workers: int) -> dict:
    """One re-score, named "bench", of a fresh copy of the run: every case must write the same bytes."""
    from rlme_flows.rescore import rlme_rescore

    from rlme_pipeline import scoreset
    from rlme_pipeline.storage.run import Run

    shutil.copytree(run_dir, copy)
    # Ray starts its workers at nice 15, below everything else on the machine: on a shared box the other
    # jobs would then take the cores and the comparison would measure them. Same priority as the driver.
    with local_ray_head(workers, env={"RAY_worker_niceness": "0"}) as address:
        t0 = time.perf_counter()
        out = rlme_rescore(run_uri=str(copy), name="bench", questions=questions, shard_rows=shard_rows, ray=address)
        seconds = time.perf_counter() - t0
    files = scoreset.unit(Run.from_url(str(copy)), "bench").manifest().files
    shutil.rmtree(copy)
    return {
        "workers": workers,
        "seconds": seconds,
        "shards": out["shards"],
        "ray_workers_used": len(out["workers"]),
        "files": {f.name: f.sha256 for f in files},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000, help="stored rollouts to re-score")
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1, help="pairs of cases (1 worker, 2 workers)")
    ap.add_argument("--tiny", action="store_true", help="smoke size: 200 rollouts in shards of 50, one pair")
    a = ap.parse_args()
    if a.tiny:
        a.n, a.shard_rows, a.repeats = 200, 50, 1
    from rlme_flows.local_prefect import local_prefect

    from benchmarks.rescore_memory import build

    with tempfile.TemporaryDirectory(prefix="rlme-bench-") as tmp:
        os.environ.setdefault("RLME_CACHE", str(Path(tmp) / "cache"))
        run_url = build(Path(tmp), a.n, 24)
        q = Path(tmp) / "questions.yaml"
        q.write_text("- id: q\n  text: Is the answer correct?\n", encoding="utf-8")
        print(f"machine: {machine()}; load average before: {load()}", flush=True)
        results = []
        with local_prefect(shared=True):  # one Prefect server for every case; the workers report to it
            for r in range(a.repeats):
                for workers in (1, 2):
                    copy = Path(tmp) / f"w{workers}-r{r}" / "demo"
                    res = case(Path(run_url), copy, str(q), a.shard_rows, workers)
                    print(f"  {workers} worker(s): {res['seconds']:.1f} s, load {load()}", flush=True)
                    results.append(res)
    if any(res["files"] != results[0]["files"] for res in results):
        raise SystemExit("the score sets differ between cases: the re-score is not deterministic across workers")
    rows = [
        [res["workers"], res["ray_workers_used"], res["shards"], res["seconds"], a.n / res["seconds"]]
        for res in results
    ]
    print(f"re-score of {a.n} rollouts (1 question x 2 evaluators), shards of {a.shard_rows}, load after: {load()}")
    print(table(["Ray worker CPUs", "workers used", "shards", "flow seconds", "rollouts/s"], rows))
    pairs = [results[i]["seconds"] / results[i + 1]["seconds"] for i in range(0, len(results), 2)]
    print(
        f"throughput 2 workers / 1 worker: {median(pairs):.2f} (pairs: {', '.join(f'{p:.2f}' for p in pairs)}; target >= 1.6)"
    )
    print("score sets identical across all cases: yes")


if __name__ == "__main__":
    main()
