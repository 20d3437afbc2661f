"""Peak memory of a re-score for N and 10N stored rollouts, side by side.

    PYTHONPATH=. python -m benchmarks.rescore_memory [--n 200] [--shard-rows 100] [--tiny]

A run with one committed iteration is trained on the tiny demo models, then its rollouts are
replicated (new prompt ids, long token-id and logprob lists like real rollouts) into runs holding N and
10N rollouts. Each re-score runs in its own subprocess; VmHWM of that process is its peak (not
ru_maxrss: Linux carries the forking parent's high-water mark over into the child). For
contrast, the same subprocesses also report the peak of reading the rollouts file whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import ROOT, table, vm_kib


def build(base: Path, n: int, tokens: int) -> str:
    import polars as pl

    from rlme_pipeline.config import load_config
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.storage.run import Run
    from rlme_pipeline.storage.store import Store

    seed_run = base / "seed"
    if not (seed_run / "demo" / "iter-000000" / "MANIFEST.json").exists():
        cfg = load_config(ROOT / "configs" / "demo.yaml").with_overrides(storage=str(seed_run), iterations=1)
        train(cfg, Run(Store(cfg.run.storage), cfg.run.id))
    dst = base / f"n{n}" / "demo"
    shutil.copytree(seed_run / "demo", dst, dirs_exist_ok=True)
    run = Run(Store(str(base / f"n{n}")), "demo")
    src = run.read_table(0, "rollouts.parquet")
    reps = -(-n // src.height)
    big = pl.concat(
        [
            src.with_columns(prompt_id=pl.col("prompt_id") + f"-{r}", rollout_id=pl.col("rollout_id") + f"-{r}")
            for r in range(reps)
        ]
    ).head(n)
    big = big.with_columns(
        completion_token_ids=pl.lit(list(range(tokens)), pl.List(pl.Int32)),
        behavior_logprobs=pl.lit([-1.0] * tokens, pl.List(pl.Float32)),
    )
    # Swap the committed rollouts for the big table: a new attempt file, listed by a rewritten manifest.
    entry = run.write_table(0, "rollouts.parquet", big, "rollouts")
    m = run.store.read_json("iter-000000/MANIFEST.json")
    m["files"] = [entry.model_dump(mode="json") if f.get("name") == entry.name else f for f in m["files"]]
    run.store.write_json("iter-000000/MANIFEST.json", m)
    return str(dst)


def peak_mb() -> float:
    return vm_kib("VmHWM") / 1024


def child(run_url: str, mode: str, shard_rows: int) -> None:
    from rlme_pipeline.config import EvaluatorConfig, QuestionConfig
    from rlme_pipeline.jobs.rescore import rescore
    from rlme_pipeline.storage.run import Run

    run = Run.from_url(run_url)
    if mode == "naive":
        df = run.read_table(0, "rollouts.parquet")
        print(json.dumps({"rows": df.height, "maxrss_mb": peak_mb()}))
        return
    import torch  # noqa: F401  (imported before measuring so both modes share the baseline)

    m = rescore(
        run,
        "bench",
        questions=[QuestionConfig(id="q", text="Is the answer correct?")],
        evaluators=[EvaluatorConfig(name="other", model="tiny:evaluator")],
        shard_rows=shard_rows,
    )
    print(json.dumps({"rows": m["files"][1]["rows"], "maxrss_mb": peak_mb()}))


def measure(run_url: str, mode: str, shard_rows: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", run_url, mode, str(shard_rows)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--shard-rows", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=4000, help="token ids per rollout (not read by the re-score)")
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: 20 and 200 rollouts of 100 tokens, shards of 10")
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], int(a.child[2]))
    if a.tiny:
        a.n, a.shard_rows, a.tokens = 20, 10, 100
    with tempfile.TemporaryDirectory(prefix="rlme-bench-") as tmp:
        os.environ.setdefault("RLME_CACHE", str(Path(tmp) / "cache"))
        rows = []
        for n in (a.n, 10 * a.n):
            url = build(Path(tmp), n, a.tokens)
            rows.append((n, measure(url, "rescore", a.shard_rows), measure(url, "naive", a.shard_rows)))
    print(f"re-score with shards of {a.shard_rows} rollouts, {a.tokens} token ids per rollout")
    print(
        table(
            ["stored rollouts", "re-score peak RSS MB", "read whole file peak RSS MB"],
            [[n, round(r["maxrss_mb"]), round(nv["maxrss_mb"])] for n, r, nv in rows],
        )
    )
    (n0, r0, _), (n1, r1, _) = rows
    print(f"re-score peak ratio {n1}/{n0} rollouts: {r1['maxrss_mb'] / r0['maxrss_mb']:.3f}")


if __name__ == "__main__":
    main()
