"""(5) What the real-model path costs on a CPU: seconds per stage from the runs' own manifests, and the hf
sampler against `model.generate()` on the same real model (benchmarks/sampler.py --model, one process).

Stage seconds are wall seconds as each manifest records them (`timings`). Iteration 0 also loads the models
(the policy, its LoRA adapter, the judge: the pool keeps them for the next iterations), so it is shown apart
from the steady iterations 1.. .
"""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks._common import ROOT, median

STAGES = ("generate", "score", "aggregate", "update")


def stage_table(results: list[dict]) -> tuple[list[str], list[list]]:
    """Median (min-max) seconds per stage over every run's iterations: iteration 0 and the others apart."""
    rows = []
    for stage in STAGES:
        first = [r["iterations"][0]["timings"].get(stage, 0.0) for r in results if r["iterations"]]
        steady = [it["timings"].get(stage, 0.0) for r in results for it in r["iterations"][1:]]
        rows.append([stage, _mmm(first), _mmm(steady), len(steady)])
    total0 = [sum(r["iterations"][0]["timings"].values()) for r in results if r["iterations"]]
    total = [sum(it["timings"].values()) for r in results for it in r["iterations"][1:]]
    rows.append(["iteration (sum)", _mmm(total0), _mmm(total), len(total)])
    return ["stage", "iteration 0 s (loads models)", "iterations 1.. s", "n (steady)"], rows


def _mmm(xs: list[float]) -> str:
    return f"{median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})" if xs else "-"


def sampler_vs_generate(model: str, tiny: bool) -> str:
    """benchmarks/sampler.py on the real model: rlme's sampler and model.generate() alternating in one process."""
    sizes = ["--batch", "2", "--prompt", "8", "--new", "4", "--repeats", "1"] if tiny else ["--repeats", "3"]
    cmd = [sys.executable, "-m", "benchmarks.sampler", "--model", model, "--methods", "rlme,generate"]
    cmd += sizes if tiny else ["--batch", "16", "--prompt", "64", "--new", "48", *sizes]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"benchmarks.sampler failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return f"$ PYTHONPATH=. OMP_NUM_THREADS=1 python -m {' '.join(cmd[2:])}\n{p.stdout.strip()}"
