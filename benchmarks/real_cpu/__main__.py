"""The real-model evidence on a CPU: SmolLM2-135M-Instruct (configs/smollm2-cpu.yaml) as policy and judge.

    PYTHONPATH=. python -m benchmarks.real_cpu            # ~45 min on 2 cores: judge check, 3 seeds x 2 arms, costs, evolve
    PYTHONPATH=. python -m benchmarks.real_cpu --tiny     # smoke sizes (tests/integration/test_benchmarks_smoke.py)

In order, each printed as a table (benchmarks/RESULTS.md, "Real model on the CPU", holds a full run):
  (a) judge check   judge_check.py: AUROC of P(yes) and of the reward on the base policy's own samples
  (b) steering      steering.py: the format question at weight 1 against 0, per seed, the rule-measured rate per iteration
  (c) costs         costs.py: seconds per stage from the steering runs' manifests; sampler vs model.generate()
  (d) evolve        evolve_real.py: `rlme evolve` with SmolLM2 as the proposer, on the first steered run
Needs `make real-models` (the GGUF file; RLME_REAL_MODELS moves it); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, machine, table
from benchmarks.real_cpu import costs, evolve_real, judge_check, steering
from benchmarks.real_cpu.recipe import recipe_dict, variant, write


def gguf_path() -> str:
    folder = Path(os.environ.get("RLME_REAL_MODELS", ROOT / ".cache" / "real-models"))
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make real-models`")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: 1 seed, 2 iterations of 2 x 2 rollouts")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (one torch thread each)")
    ap.add_argument("--judge-prompts", type=int, default=48, help="prompts of the judge check (x group size samples)")
    ap.add_argument("--evolve-candidates", type=int, default=4)
    ap.add_argument("--out", default=None, help="where the runs go (default: a new temporary folder)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.tiny:
        seeds, a.iterations, a.jobs, a.judge_prompts, a.evolve_candidates = seeds[:1], 2, 1, 2, 1
    out = Path(a.out or tempfile.mkdtemp(prefix="rlme-real-cpu-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    gguf, t0 = gguf_path(), time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start (shared machine)")
    print(f"runs and configs under {out}\n")

    # (a) the judge, before any RL
    from rlme_pipeline.backends.session import Backends
    from rlme_pipeline.config import load_config
    from rlme_pipeline.models.loading import resolve_ref

    d = variant(recipe_dict(gguf), run_id="judge-check", seed=0, tiny=a.tiny)
    d["run"]["storage"] = str(out / "runs")
    cfg = load_config(write(d, out / "configs"))
    with Backends() as backends:
        samples = judge_check.base_samples(cfg, a.judge_prompts, backends)
        check, truth = judge_check.check(cfg, samples, backends)
    print(f"(a) judge check: {judge_check.summary(truth)}")
    print(table(check.columns, check.rows()), "\n")
    t_a = time.perf_counter()
    load = [os.getloadavg()[0]]

    # (b) steering: the format question at weight 1 against 0, paired by seed
    results = steering.run_all(steering.cases(seeds, a.iterations, str(out / "runs"), gguf, a.tiny), a.jobs)
    t_b = time.perf_counter()
    load.append(os.getloadavg()[0])
    print(f"(b) steering: {len(seeds)} seeds x {list(steering.CONDITIONS)}, {a.iterations} iterations each, {a.jobs} at a time; load average {load[0]:.1f} before, {load[1]:.1f} after")  # fmt: skip
    print(table(*steering.rate_table(results)))
    print(steering.late_summary(results), "\n")

    # (c) costs
    print("(c) seconds per stage (wall, from the manifests of the runs above; they ran", a.jobs, "at a time)")
    print(table(*costs.stage_table(results)), "\n")
    print(costs.sampler_vs_generate(resolve_ref(f"gguf:{gguf}"), a.tiny), "\n")
    t_c = time.perf_counter()

    # (d) evolve with the real model as the proposer, on the first steered run's last two iterations
    first = next(r for r in results if r["condition"] == "steer")
    window = f"{max(0, a.iterations - 2)}:{a.iterations}"
    proposer = resolve_ref(f"gguf:{gguf}")  # the imported directory, as a user would name it
    tokens, probes = (64, 1) if a.tiny else (512, 4)  # 512 and 4: rlme evolve's defaults
    ev = evolve_real.run_evolve(first["run"], proposer, "smollm2", a.evolve_candidates, window, tokens, probes)
    n = evolve_real.counts(ev["manifest"])
    print(f"(d) rlme evolve {first['run']} --proposer <SmolLM2 dir> --candidates {a.evolve_candidates} --iterations {window}")  # fmt: skip
    print(table(["drafts", "parsed", "passed gates", "won"], [[n["drafts"], n["parsed"], n["passed gates"], n["won"]]]))
    print(f"choice: {n['why']}")
    for r in n["rejections"] + n["ineligible"]:
        print(f"  - {str(r)[:300]}")
    t_d = time.perf_counter()

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    minutes = {"judge check": t_a - t0, "steering": t_b - t_a, "costs": t_c - t_b, "evolve": t_d - t_c}
    print("\nminutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in minutes.items()) + f"; total {(t_d - t0) / 60:.1f}")
    (out / "results.json").write_text(
        json.dumps({"check": check.to_dicts(), "steering": results, "evolve": n, "seconds": minutes}, indent=1)
    )
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
