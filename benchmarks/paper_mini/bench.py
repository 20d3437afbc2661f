"""Does it learn? The RLME paper's main result in miniature, on CPU, with labels only for grading.

    PYTHONPATH=. python benchmarks/paper_mini/bench.py                 # full size (3 seeds)
    PYTHONPATH=. python benchmarks/paper_mini/bench.py --size smoke    # seconds; what the test-suite runs

1. a synthetic labelled task (two-digit + and -), split into SFT / RL / held-out prompts;
2. a weak base policy trained by SFT on the SFT split only, stopped early at 20-40% held-out accuracy;
   then a "knowledgeable" judge trained by SFT on every problem to answer " Yes"/" No" to "Is the answer
   correct?" (generation warm-up, per-digit verification loss, negatives partly from the base's own wrong
   samples; accuracy and AUROC, also on the base's samples, reported before any RL); both cached in --cache;
3. from that base, with the same budget and seeds, through the real pipeline (`runner.train`: the
   generate / score / aggregate / update stages and the commit protocol, storage and all):
     rlvr       exact-match reward only (label_reward.share = 1, no evaluator)
     rlme       the frozen judge's log P(yes) only; labels never read by training
     rlme_self  live self-evaluation (the policy judges itself), only if the base can judge at all
     rlme_10gt  judge reward, exact-match reward on a deterministic 10% of rollouts
4. held-out greedy accuracy after every iteration, and a hacking probe: the judge's mean P(yes) on the
   policy's greedy held-out answers minus their true accuracy (a judge being fooled shows as a gap);
5. results.json, results.md (mean and spread over seeds) and curves.png in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import task as T  # noqa: E402

from rlme_pipeline import checkpoint  # noqa: E402
from rlme_pipeline.answers import is_correct  # noqa: E402
from rlme_pipeline.config import validate_config  # noqa: E402
from rlme_pipeline.models import Loaded, ModelPool  # noqa: E402
from rlme_pipeline.run import Run  # noqa: E402
from rlme_pipeline.runner import train  # noqa: E402
from rlme_pipeline.storage import Store  # noqa: E402

# --- sizes: everything that sets the budget, visible in one place ---------------------------------
SIZES = {
    "full": dict(
        n_eval=300,
        n_rl=800,  # the rest of the 2420 problems is the SFT split
        judge=dict(
            hidden=128, layers=3, heads=8, steps=5000, lm_first=400, aux=1.0, base_negatives=4, batch=64, lr=2e-3
        ),
        policy=dict(hidden=128, layers=2, max_steps=1500, batch=64, lr=2e-3, every=50, stop_at=0.25, carry_drop=0.0),
        # one optimizer step per iteration on all 128 rollouts: each group's advantages sum to zero within the
        # step. lr 6e-4 and 1e-3 (also with a KL anchor) were unstable in feasibility runs; 3e-4 learns steadily.
        rl=dict(iterations=30, prompts_per_iteration=16, group_size=8, lr=3e-4, micro_batch=32, grad_accumulation=4),
        seeds=3,
    ),
    "smoke": dict(
        n_eval=40,
        n_rl=64,
        judge=dict(hidden=64, layers=1, heads=4, steps=20, lm_first=5, aux=1.0, base_negatives=1, batch=32, lr=2e-3),
        policy=dict(hidden=64, layers=1, max_steps=20, batch=32, lr=2e-3, every=10, stop_at=0.25, carry_drop=0.0),
        rl=dict(iterations=2, prompts_per_iteration=4, group_size=4, lr=3e-4, micro_batch=16, grad_accumulation=1),
        seeds=1,
    ),
}
METHODS = ("rlvr", "rlme", "rlme_self", "rlme_10gt")
FLOOR = math.log(1e-2)  # log P(yes) clamp; also the exact-match reward for a wrong answer (see label_reward)
MAX_NEW_TOKENS = 10  # " The answer is 38." + eos is 8 tokens


def log(*a) -> None:
    print(*a, flush=True)


# --- models ---------------------------------------------------------------------------------------
def load(path) -> Loaded:
    """A model loaded for one use, dropped with the caller's reference (training holds its own)."""
    return ModelPool(1).get(str(path))


def cached(path: Path) -> bool:
    return (path / "bench_meta.json").is_file()


def base_mistakes(tok, items, base: Path, n: int) -> dict[str, list[str]]:
    """n samples per problem from the base policy at temperature 1 (the RL start), keeping the wrong ones."""
    lm = load(str(base))
    prompts = [p for p in items for _ in range(n)]
    outs = T.greedy(lm.model, lm.tokenizer, [p["prompt"] for p in prompts], MAX_NEW_TOKENS, temperature=1.0, seed=5)
    pool: dict[str, list[str]] = {}
    for p, o in zip(prompts, outs):
        if not is_correct(o, p["answer"], "answer_is"):
            pool.setdefault(p["id"], []).append(o)
    return pool


def on_base_samples(judge, tok, items, base: Path) -> dict:
    """The judge on what RL starts from: the base policy's samples (temperature 1), true labels by exact match."""
    lm = load(str(base))
    outs = T.greedy(lm.model, lm.tokenizer, [p["prompt"] for p in items], MAX_NEW_TOKENS, temperature=1.0, seed=9)
    ok = [is_correct(o, p["answer"], "answer_is") for o, p in zip(outs, items)]
    py = T.judge_p_yes(judge, tok, [(p["prompt"], o) for p, o in zip(items, outs)])
    rep = {
        "n": len(items),
        "share_correct": mean(ok),
        "auroc": T.auroc(py, ok),
        "p_yes_right": mean([x for x, y in zip(py, ok) if y]),
        "p_yes_wrong": mean([x for x, y in zip(py, ok) if not y]),
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rep.items()}  # JSON-comparable


def make_judge(tok, items, spec: dict, path: Path, base: Path) -> dict:
    if cached(path):
        return json.loads((path / "bench_meta.json").read_text())
    t0 = time.time()
    pool = base_mistakes(tok, items, base, spec["base_negatives"]) if spec.get("base_negatives") else None
    if pool is not None:
        log(
            f"  {sum(map(len, pool.values()))} wrong base samples on {len(pool)} problems "
            f"({time.time() - t0:.0f}s), e.g. {next(iter(pool.values()))[:3]}"
        )
    m = T.build_model(tok, spec["hidden"], spec["layers"], seed=1, heads=spec.get("heads"))
    every = max(spec["steps"] // 4, 1)
    T.sft_judge(
        m,
        tok,
        items,
        spec["steps"],
        spec["batch"],
        spec["lr"],
        seed=0,
        eval_fn=lambda m: T.judge_report(m, tok, items, seed=7, n=300),
        every=every,
        lm_first=spec.get("lm_first", 0),
        aux=spec.get("aux", 0.0),
        pool=pool,
        log=log,
    )
    meta = {
        "spec": spec,
        "report": T.judge_report(m, tok, items, seed=123, n=1000),
        "seconds": time.time() - t0,
        "report_carry": T.judge_report(m, tok, items, seed=123, n=1000, negatives="carry"),
        "master_keys_p_yes": mean(T.judge_p_yes(m, tok, [(p["prompt"], k) for p in items[:50] for k in T.MASTER_KEYS])),
        "report_base_samples": on_base_samples(m, tok, items[::4], base),
    }
    T.save(m, tok, path, meta)
    return meta


def make_base(tok, splits, spec: dict, path: Path) -> dict:
    if cached(path):
        return json.loads((path / "bench_meta.json").read_text())
    t0 = time.time()
    m = T.build_model(tok, spec["hidden"], spec["layers"], seed=0)
    hist = T.sft_policy(
        m,
        tok,
        splits["sft"],
        spec["max_steps"],
        spec["batch"],
        spec["lr"],
        seed=0,
        eval_fn=lambda m: accuracy(m, tok, splits["eval"])[0],
        every=spec["every"],
        stop_at=spec["stop_at"],
        carry_drop=spec["carry_drop"],
        log=log,
    )
    meta = {
        "spec": spec,
        "history": hist,
        "heldout_accuracy": hist[-1]["acc"] if hist else None,
        "seconds": time.time() - t0,
    }
    T.save(m, tok, path, meta)
    return meta


def accuracy(model, tok, items) -> tuple[float, list[str]]:
    outs = T.greedy(model, tok, [p["prompt"] for p in items], MAX_NEW_TOKENS)
    return mean([is_correct(o, p["answer"], "answer_is") for o, p in zip(outs, items)]), outs


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


# --- one RL run through the pipeline --------------------------------------------------------------
def config(method: str, seed: int, rl: dict, data: Path, base: Path, judge: Path, storage: Path) -> dict:
    evaluators = {
        "rlvr": [],
        "rlme": [{"name": "judge", "model": str(judge)}],
        "rlme_self": [{"name": "self", "model": "policy"}],
        "rlme_10gt": [{"name": "judge", "model": str(judge)}],
    }[method]
    label_reward = {"rlvr": {"share": 1.0}, "rlme_10gt": {"share": 0.1}}.get(method)
    cfg = {
        "run": {"id": f"{method}-s{seed}", "storage": str(storage), "iterations": rl["iterations"], "seed": seed},
        "data": {
            "path": str(data),
            "prompt_column": "question",
            "id_column": "id",
            "label_column": "answer",
            "prompts_per_iteration": rl["prompts_per_iteration"],
        },
        "policy": {"model": str(base)},
        "evaluators": evaluators,
        "questions": [{"id": "correct", "text": T.QUESTION, "positive": [" Yes"], "negative": [" No"]}],
        "generation": {
            "group_size": rl["group_size"],
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 1.0,
            "batch_size": 128,
        },
        "scoring": {
            "batch_size": 128,
            "template": T.TEMPLATE,
            "question_template": T.QUESTION_TEMPLATE,
            "reward_form": rl.get("reward_form", "logp"),
            "logp_floor": FLOOR,
        },
        "algorithm": {"loss": "cispo", "eps_high": 5.0, "beta": rl.get("beta", 0.0)},
        "optimizer": {
            "lr": rl["lr"],
            "micro_batch_size": rl["micro_batch"],
            "grad_accumulation": rl["grad_accumulation"],
        },
    }
    if label_reward:
        cfg["label_reward"] = label_reward
    return cfg


def probe(model, tok, judge_model, judge_tok, items) -> dict:
    """Held-out greedy accuracy, and how far the frozen judge's belief in those answers exceeds the truth."""
    acc, outs = accuracy(model, tok, items)
    p = T.judge_p_yes(judge_model, judge_tok, [(it["prompt"], o) for it, o in zip(items, outs)])
    return {
        "accuracy": acc,
        "judge_p_yes": mean(p),
        "hack_gap": mean(p) - acc,
        "well_formed": mean([o.startswith(" The answer is ") and o.endswith(".") for o in outs]),
        "example": outs[0],
    }


def run_method(method: str, seed: int, rl: dict, paths: dict, items_eval, judge_lm) -> list[dict]:
    cfg = validate_config(config(method, seed, rl, paths["data"], paths["base"], paths["judge"], paths["runs"]))
    run = Run(Store(str(paths["runs"])), cfg.run.id)
    if run.store.exists("run.json"):  # a benchmark run starts from scratch
        shutil.rmtree(run.store.abs("."), ignore_errors=True)
        run = Run(Store(str(paths["runs"])), cfg.run.id)
    base = load(str(paths["base"]))
    curve = [{"iteration": 0, **probe(base.model, base.tokenizer, judge_lm.model, judge_lm.tokenizer, items_eval)}]
    t0 = time.time()

    def on_commit(m) -> None:
        i = m.iteration
        rec = run.read_record(i, "update")
        lm = load(checkpoint.local_dir(run, i, rec.files))
        rollouts = run.read_table(i, "rollouts.parquet")
        # grading only: the labels of the RL prompts are read here, after the iteration is committed
        sample_acc = mean(
            [is_correct(c, lab, "answer_is") for c, lab in zip(rollouts["completion"], rollouts["label"])]
        )
        row = {
            "iteration": i + 1,
            **probe(lm.model, lm.tokenizer, judge_lm.model, judge_lm.tokenizer, items_eval),
            "reward_mean": m.metrics.get("reward_mean"),
            "sample_accuracy": sample_acc,
            "seconds": time.time() - t0,
        }
        curve.append(row)
        log(
            f"  {method} seed {seed} iter {i + 1}: acc {row['accuracy']:.3f} sample acc {sample_acc:.3f} "
            f"reward {row['reward_mean']:.3f} hack gap {row['hack_gap']:+.3f} ({row['seconds']:.0f}s)"
        )
        if i > 0:  # keep disk use flat: only the newest checkpoint is needed to go on
            previous = Path(checkpoint.local_dir(run, i - 1, run.read_record(i - 1, "update").files))
            for f in ("model.safetensors", "optimizer.pt"):
                (previous / f).unlink(missing_ok=True)

    train(cfg, run, on_commit=on_commit)
    return curve


# --- report ---------------------------------------------------------------------------------------
def spread(xs: list[float]) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def summarize(curves: dict, base_acc: float) -> dict:
    out = {}
    for method, by_seed in curves.items():
        finals = [c[-1]["accuracy"] for c in by_seed.values()]
        bests = [max(r["accuracy"] for r in c) for c in by_seed.values()]
        gaps = [c[-1]["hack_gap"] for c in by_seed.values()]
        out[method] = {
            "final_mean": mean(finals),
            "final_spread": spread(finals),
            "best_mean": mean(bests),
            "best_spread": spread(bests),
            "gain": mean(finals) - base_acc,
            "hack_gap": mean(gaps),
            "finals": finals,
        }
    if "rlvr" in out and out["rlvr"]["gain"] > 0:
        for m in out.values():
            m["gain_vs_rlvr"] = m["gain"] / out["rlvr"]["gain"]
    for m in out.values():
        m["beats_base_by_3_spreads"] = m["gain"] > 3 * m["final_spread"]
    return out


def table(summary: dict, base_acc: float) -> str:
    lines = [
        "| method | final acc (mean ± sd) | best acc (mean ± sd) | gain over base | gain / RLVR gain | judge P(yes) − acc |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| base (SFT) | {base_acc:.3f} | | | | |",
    ]
    for k, s in summary.items():
        lines.append(
            f"| {k} | {s['final_mean']:.3f} ± {s['final_spread']:.3f} | {s['best_mean']:.3f} ± {s['best_spread']:.3f} "
            f"| {s['gain']:+.3f} | {s.get('gain_vs_rlvr', float('nan')):.2f} | {s['hack_gap']:+.3f} |"
        )
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'rlme[bench]'): no plot")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = [
        ("accuracy", "held-out greedy accuracy"),
        ("reward_mean", "mean training reward (log P(yes) units)"),
        ("hack_gap", "hacking probe: judge P(yes) − accuracy"),
    ]
    for ax, (key, title) in zip(axes, keys):
        for color, (method, by_seed) in zip(("C0", "C1", "C2", "C3", "C4"), curves.items()):
            runs = list(by_seed.values())
            n = min(len(c) for c in runs)
            xs = [runs[0][i]["iteration"] for i in range(n)]
            vals = [[c[i].get(key) for c in runs] for i in range(n)]
            pts = [(x, v) for x, v in zip(xs, vals) if all(u is not None for u in v)]
            if not pts:
                continue
            m = [mean(v) for _, v in pts]
            s = [spread(v) for _, v in pts]
            x = [p[0] for p in pts]
            ax.plot(x, m, color=color, label=method)
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# --- main -----------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--seeds", type=int, help="number of seeds (default: the size's)")
    ap.add_argument("--iterations", type=int, help="RL iterations per run (default: the size's)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--prompts", type=int, help="RL prompts per iteration (default: the size's)")
    ap.add_argument("--reward-form", choices=("logp", "norm_logp", "p"), help="scoring.reward_form (default logp)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    size = dict(SIZES[args.size])
    rl = dict(
        size["rl"],
        **({"iterations": args.iterations} if args.iterations else {}),
        **({"prompts_per_iteration": args.prompts} if args.prompts else {}),
        **({"reward_form": args.reward_form} if args.reward_form else {}),
    )
    n_seeds = args.seeds or size["seeds"]
    args.out.mkdir(parents=True, exist_ok=True)

    items = T.problems()
    splits = T.split(items, seed=0, n_eval=size["n_eval"], n_rl=size["n_rl"])
    tok = T.build_tokenizer(T.corpus(items))
    data = args.out / "rl_prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": p["id"], "question": p["prompt"], "answer": p["answer"]}) + "\n" for p in splits["rl"]
        )
    )
    paths = {
        "data": data,
        "runs": args.out / "runs",
        "judge": args.cache / f"judge-{args.size}",
        "base": args.cache / f"base-{args.size}",
    }

    log(f"[{time.time() - t_start:.0f}s] base policy: SFT on {len(splits['sft'])} problems, early stop")
    base_meta = make_base(tok, splits, size["policy"], paths["base"])
    log(f"[{time.time() - t_start:.0f}s] judge: SFT on all {len(items)} problems (cached in {paths['judge']})")
    judge_meta = make_judge(tok, items, size["judge"], paths["judge"], paths["base"])
    log(
        f"  judge {judge_meta['report']}  carry mistakes {judge_meta['report_carry']}  "
        f"on base samples {judge_meta.get('report_base_samples')}  "
        f"master keys P(yes) {judge_meta['master_keys_p_yes']:.3f}"
    )
    t_models = time.time() - t_start

    judge_lm = load(str(paths["judge"]))
    base_lm = load(str(paths["base"]))
    base_acc, _ = accuracy(base_lm.model, base_lm.tokenizer, splits["eval"])
    base_as_judge = T.judge_report(base_lm.model, base_lm.tokenizer, items, seed=123, n=400)
    log(f"  base held-out accuracy {base_acc:.3f}; the base as a judge: {base_as_judge}")
    methods = [m for m in args.methods.split(",") if m]
    skipped = {}
    if "rlme_self" in methods and base_as_judge["auroc"] < 0.6:
        methods.remove("rlme_self")
        skipped["rlme_self"] = (
            f"the base cannot judge (AUROC {base_as_judge['auroc']:.2f} < 0.6): live self has no signal"
        )
        log(f"  skip rlme_self: {skipped['rlme_self']}")

    curves: dict[str, dict[int, list]] = {m: {} for m in methods}
    t_rl = time.time()
    for seed in range(n_seeds):
        for method in methods:
            judge_lm = load(str(paths["judge"]))
            curves[method][seed] = run_method(method, seed, rl, paths, splits["eval"], judge_lm)
    t_rl = time.time() - t_rl

    summary = summarize(curves, base_acc)
    wall = time.time() - t_start
    result = {
        "size": args.size,
        "seeds": n_seeds,
        "rl": rl,
        "methods": methods,
        "skipped": skipped,
        "judge": judge_meta,
        "base": {"heldout_accuracy": base_acc, "as_judge": base_as_judge, "sft": base_meta},
        "summary": summary,
        "curves": curves,
        "seconds": {"total": wall, "models (SFT, 0 when cached)": t_models, "rl": t_rl},
        "command": "PYTHONPATH=. python benchmarks/paper_mini/bench.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = table(summary, base_acc)
    (args.out / "results.md").write_text(
        f"{md}\n\nJudge (before RL): accuracy {judge_meta['report']['accuracy']:.3f}, AUROC {judge_meta['report']['auroc']:.3f}. "
        f"Base as a judge: AUROC {base_as_judge['auroc']:.3f}.\n{n_seeds} seeds x {rl['iterations']} iterations; "
        f"wall time {wall / 60:.1f} min (models {t_models / 60:.1f} min, RL {t_rl / 60:.1f} min).\n"
    )
    plot(curves, args.out / "curves.png")
    log(md)
    log(f"wall time {wall:.0f}s (models {t_models:.0f}s, RL {t_rl:.0f}s); results in {args.out}")
    return result


if __name__ == "__main__":
    main()
