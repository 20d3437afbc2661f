"""(b) Does RLME with the real 135M judge steer a behaviour a rule can measure?

The recipe asks two questions: "Is the answer correct?" and the format question ("Does the response follow
the requested answer format?", the prompt asking for a final "The answer is N."). The experiment trains the
recipe twice per seed: as it is (format weight 1) and as the control with the format question at weight 0
(still asked, so the judge's P(yes) is recorded; it adds nothing to the reward). Everything else is the
same, seeds included, so a difference in the rule-measured rate (`ends_with_answer`) between the two is the
format question's doing. The rate is read off every iteration's rollouts (G samples of each prompt, at the
training temperature): iteration i's rollouts are the policy after i updates.

Each run is a fresh process (`--case`), one torch thread each; `jobs` of them run at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from benchmarks._common import emit, run_case
from benchmarks.real_cpu.recipe import STEER, ends_with_answer, recipe_dict, variant, write

CONDITIONS = {"steer": 1.0, "control": 0.0}  # the format question's weight


def cases(seeds: list[int], iterations: int, storage: str, gguf: str | None, tiny: bool) -> list[dict]:
    base, out = recipe_dict(gguf), []
    folder = Path(storage) / "configs"
    for seed in seeds:
        for cond, w in CONDITIONS.items():
            d = variant(base, run_id=f"{cond}-s{seed}", seed=seed, steer_weight=w, tiny=tiny)
            d["run"].update(storage=storage, iterations=iterations)
            out.append({"config": str(write(d, folder)), "condition": cond, "seed": seed})
    return out


def run_all(cases: list[dict], jobs: int) -> list[dict]:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread per run: see benchmarks/RESULTS.md
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: run_case("benchmarks.real_cpu.steering", c, env=env, timeout=7200), cases))


def _case(case: dict) -> None:
    """One training run, in this fresh process: the library's train job, as `rlme train` runs it minus Prefect."""
    from rlme_pipeline.config import load_config
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.storage.run import Run

    cfg = load_config(case["config"])
    run = Run.for_config(cfg)
    train(cfg, run)
    emit({**case, "run": run.url, "iterations": per_iteration(run)})


def per_iteration(run) -> list[dict]:
    """What each committed iteration's rollouts and scores say: the rule-measured rate and the judge."""
    from rlme_pipeline.storage.run import ROLLOUTS_FILE, SCORES_FILE

    out = []
    for i in run.committed():
        m = run.manifest(i)
        roll = run.read_table(i, ROLLOUTS_FILE)
        scores = run.read_table(i, SCORES_FILE).filter(pl.col("question_id") == STEER)
        ok = [ends_with_answer(c) for c in roll["completion"]]
        out.append(
            {
                "iteration": i,
                "format_rate": sum(ok) / len(ok),
                "p_yes_format": float(scores["p_yes"].mean()),  # normalised P(yes) of the format question
                "reward_mean": m.metrics["reward_mean"],
                "tokens_mean": m.metrics["completion_tokens_mean"],
                "timings": m.timings,
                "example": roll["completion"][0],
            }
        )
    return out


def rate_table(results: list[dict]) -> tuple[list[str], list[list]]:
    """Per iteration: each condition's format rate, mean ± sd over seeds, and the steer - control
    difference paired by seed (same prompts and sampling seeds, so the shared noise cancels)."""
    by = {(r["condition"], r["seed"]): {it["iteration"]: it for it in r["iterations"]} for r in results}
    seeds, differ = sorted({r["seed"] for r in results}), divergence(results)
    iterations = sorted({i for r in results for i in (it["iteration"] for it in r["iterations"])})
    rows = []
    for i in iterations:
        row = [i]
        for cond in CONDITIONS:
            xs = [by[(cond, s)][i]["format_rate"] for s in seeds]
            row.append(_mean_sd(xs))
        diffs = [by[("steer", s)][i]["format_rate"] - by[("control", s)][i]["format_rate"] for s in seeds]
        row.append(_mean_sd(diffs, signed=True))
        for cond in CONDITIONS:
            row.append(_mean_sd([by[(cond, s)][i]["p_yes_format"] for s in seeds]))
        row.append(f"{differ.get(i, float('nan')):.2f}")
        rows.append(row)
    headers = ["iteration", "format rate steer", "format rate control", "steer - control (paired)"]
    headers += ["judge P(yes) format, steer", "judge P(yes) format, control", "completions differing"]
    return headers, rows


def divergence(results: list[dict]) -> dict[int, float]:
    """Per iteration, the share of rollouts whose completion differs between the two arms of a seed, over
    all seeds: both arms draw with the same seeds, so identical policies give identical text. It says how far
    the format question's weight moved the policy at all, whatever the rule says."""
    from rlme_pipeline.storage.run import ROLLOUTS_FILE, Run

    runs = {(r["condition"], r["seed"]): Run.from_url(r["run"]) for r in results}
    seeds = sorted({r["seed"] for r in results})
    out: dict[int, list[bool]] = {}
    for s in seeds:
        a, b = runs[("steer", s)], runs[("control", s)]
        for i in sorted(set(a.committed()) & set(b.committed())):
            ta = a.read_table(i, ROLLOUTS_FILE).sort("prompt_id", "sample_index")["completion"].to_list()
            tb = b.read_table(i, ROLLOUTS_FILE).sort("prompt_id", "sample_index")["completion"].to_list()
            out.setdefault(i, []).extend(x != y for x, y in zip(ta, tb))
    return {i: sum(v) / len(v) for i, v in out.items()}


def late_summary(results: list[dict]) -> str:
    """The format rate averaged over the second half of the iterations (more samples per seed than one
    iteration's 16), per condition, and the paired difference: mean ± sd over seeds."""
    last = max(it["iteration"] for r in results for it in r["iterations"])
    late = lambda r: statistics.mean(it["format_rate"] for it in r["iterations"] if it["iteration"] >= (last + 1) // 2)  # noqa: E731
    by = {(r["condition"], r["seed"]): late(r) for r in results}
    seeds = sorted({r["seed"] for r in results})
    base = statistics.mean(it["format_rate"] for r in results for it in r["iterations"] if it["iteration"] == 0)
    diffs = [by[("steer", s)] - by[("control", s)] for s in seeds]
    return (
        f"format rate at iteration 0 (base policy, all runs): {base:.3f}; over iterations {(last + 1) // 2}-{last}: "
        f"steer {_mean_sd([by[('steer', s)] for s in seeds])}, control {_mean_sd([by[('control', s)] for s in seeds])}, "
        f"steer - control paired by seed {_mean_sd(diffs, signed=True)} (per seed: {', '.join(f'{d:+.3f}' for d in diffs)})"
    )


def _mean_sd(xs: list[float], signed: bool = False) -> str:
    m = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:+.3f} ± {sd:.3f}" if signed else f"{m:.3f} ± {sd:.3f}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", help="one training run (JSON), in this process")
    ap.add_argument("--report", help="reprint the steering tables from a finished benchmark's results.json")
    a = ap.parse_args()
    if a.case:
        _case(json.loads(a.case))
    else:
        from benchmarks._common import table

        results = json.loads(Path(a.report).read_text())["steering"]
        print(table(*rate_table(results)))
        print(late_summary(results))
