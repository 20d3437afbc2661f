"""Does it learn, robustly? The RLME paper's main result in miniature, on CPU, with labels only for grading.

    PYTHONPATH=. python benchmarks/paper_mini/bench.py                       # check: 5 RL seeds x judge seed 1
    PYTHONPATH=. python benchmarks/paper_mini/bench.py --experiments main    # 5 RL seeds x 3 judge seeds
    PYTHONPATH=. python benchmarks/paper_mini/bench.py --experiments main,threshold,mitigations,tradeoff,self
    PYTHONPATH=. python benchmarks/paper_mini/bench.py --experiments recipe  # how the RL recipe was chosen
    PYTHONPATH=. python benchmarks/paper_mini/bench.py --size smoke          # seconds; what the test-suite runs

1. a synthetic labelled task (two-digit + and -), split into SFT / RL / held-out prompts;
2. a weak base policy trained by SFT on the SFT split only, stopped early at 20-40% held-out accuracy;
   then one "knowledgeable" judge per judge seed, trained by SFT on every problem to answer " Yes"/" No" to
   "Is the answer correct?" **until it reaches a target AUROC on a validation split of the base policy's own
   samples** (not for a fixed number of steps: the step at which a judge "gets it" varies with its seed).
   On the way, the first checkpoint past each lower quality level is kept: the judges of the threshold curve.
   Every model is trained in one thread, so it is the same whatever --jobs or the machine's core count;
3. from that base, with the same budget and seeds, through the real pipeline (`runner.train`: the
   generate / score / aggregate / update stages and the commit protocol, storage and all):
     rlvr       exact-match reward only (label_reward.share = 1, no evaluator)
     rlme       the frozen judge's log P(yes) only; labels never read by training
     rlme_self  live self-evaluation (the policy judges itself), only if the base can judge at all (the
                `self` experiment starts from a base also taught to judge, and adds frozen self)
     rlme_10gt  judge reward, exact-match reward on a deterministic 10% of rollouts
4. held-out greedy accuracy after every iteration; a hacking probe (the training judge's mean P(yes) on the
   policy's greedy held-out answers minus their true accuracy); and a label-free one: the same P(yes) from
   an independently seeded judge of the same quality (the "watcher"), which a user can compute;
5. experiments: `check` (the default: `main` with the first judge seed, under 45 minutes cold on 2 cores),
   `main` (every method, every RL seed x judge seed), `threshold` (RLME and RLME-10GT with the
   judges stopped at each quality level), `mitigations` (at the lower levels: an ensemble of the judge seeds,
   a KL anchor, the P(yes) reward form, stopping when the watcher disagrees), `recipe` (RLVR under candidate
   RL recipes, on tuning seeds only), `tradeoff` (a second question at several weights), `self` (live self,
   frozen self, frozen other and RLVR from a base also taught to judge) and `self_recipe` (its RL recipe, on
   tuning seeds); results.json, results.md and plots in --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import task as T  # noqa: E402

from rlme_pipeline.algorithm.answers import is_correct  # noqa: E402
from rlme_pipeline.config import validate_config  # noqa: E402
from rlme_pipeline.jobs.train import train  # noqa: E402
from rlme_pipeline.models import checkpoint  # noqa: E402
from rlme_pipeline.models.loading import Loaded, ModelPool  # noqa: E402
from rlme_pipeline.storage.run import Run  # noqa: E402
from rlme_pipeline.storage.store import Store  # noqa: E402

# --- sizes: everything that sets the budget, visible in one place ---------------------------------
SIZES = {
    "full": dict(
        n_eval=300,
        n_rl=800,  # the rest of the 2420 problems is the SFT split
        n_val=400,  # problems whose base samples validate the judge (never among its training negatives)
        judge=dict(
            hidden=128,
            layers=3,
            heads=8,
            steps=6000,  # the cosine horizon; training stops earlier at the target
            tail=4000,  # then at most this many steps at a constant 0.1 x lr (the cap: 10,000 steps in all)
            check_every=250,
            target=0.99,  # AUROC on the validation split of the base policy's own samples
            levels=(0.8, 0.9, 0.95, 0.98),  # keep the first checkpoint past each: the threshold curve's judges
            lm_first=400,
            aux=1.0,
            base_negatives=4,
            batch=64,
            lr=2e-3,
        ),
        policy=dict(hidden=128, layers=2, max_steps=1500, batch=64, lr=2e-3, every=50, stop_at=0.25, carry_drop=0.0),
        # one optimizer step per iteration on all 128 rollouts: each group's advantages sum to zero within the
        # step. The recipe (lr, its decay over the run) was chosen by `--experiments recipe` on seeds 100-102.
        rl=dict(
            iterations=30,
            prompts_per_iteration=16,
            group_size=8,
            lr=3e-4,
            lr_decay_iterations=30,  # cosine to 3e-5: RLVR final 0.428 ± 0.017, 0.002 below its best (constant: 0.061)
            micro_batch=32,
            grad_accumulation=4,
        ),
        seeds=(0, 1, 2, 3, 4),
        judge_seeds=(1, 2, 3),
        sweep_seeds=(0, 1),  # RL seeds per judge seed at each point of the threshold and mitigation sweeps
        mitigation_levels=(0.9,),
        gt_levels=(0.9,),  # RLME-10GT beside RLME at these levels of the threshold sweep
        kl_beta=0.1,
        recipes={
            "constant 3e-4": {"lr_decay_iterations": 0},
            "cosine 3e-4 -> 3e-5": {"lr_decay_iterations": 30},
            "cosine 6e-4 -> 6e-5": {"lr": 6e-4, "lr_decay_iterations": 30},
            "constant 3e-4, KL 0.1": {"lr_decay_iterations": 0, "beta": 0.1},
            "constant 3e-4, 32 prompts": {"lr_decay_iterations": 0, "prompts_per_iteration": 32},
        },
        recipe_seeds=(100, 101, 102),
        # the base, also taught to judge on its SFT problems (the live-self evaluator); validated on RL problems
        self_judge=dict(
            steps=4000, check_every=250, target=0.99, n_val=400, base_negatives=4, aux=1.0, batch=64, lr=1e-3
        ),
        self_rl={"lr": 3e-5},  # chosen by `--experiments self_recipe` (seeds 100-102): 3e-4 falls 0.15 from 0.89
        self_recipes={"lr 3e-4 (the main recipe)": {}, "lr 1e-4": {"lr": 1e-4}, "lr 3e-5": {"lr": 3e-5}},
        # the target judge of the first judge seed, taught "Is the answer even?" too; reward log P(correct) +
        # w log P(even): for w < 1 an odd right answer beats an even wrong one, for w > 1 the reverse
        tradeoff=dict(steps=400, batch=64, lr=5e-4, weights=(0.0, 0.5, 1.0, 2.0), seeds=(0, 1, 2)),
    ),
    "smoke": dict(
        n_eval=40,
        n_rl=64,
        n_val=40,
        judge=dict(
            hidden=64,
            layers=1,
            heads=4,
            steps=20,
            tail=10,
            check_every=10,
            target=0.99,
            levels=(0.0,),  # any judge passes: the sweep's plumbing is what the smoke size checks
            lm_first=5,
            aux=1.0,
            base_negatives=1,
            batch=32,
            lr=2e-3,
        ),
        policy=dict(hidden=64, layers=1, max_steps=20, batch=32, lr=2e-3, every=10, stop_at=0.25, carry_drop=0.0),
        rl=dict(
            iterations=2,
            prompts_per_iteration=4,
            group_size=4,
            lr=3e-4,
            lr_decay_iterations=0,
            micro_batch=16,
            grad_accumulation=1,
        ),
        seeds=(0,),
        judge_seeds=(1, 2),
        sweep_seeds=(0,),
        mitigation_levels=(0.0,),
        gt_levels=(0.0,),
        kl_beta=0.1,
        recipes={"constant": {}, "cosine": {"lr_decay_iterations": 2}},
        recipe_seeds=(100,),
        tradeoff=dict(steps=4, batch=16, lr=5e-4, weights=(0.0, 2.0), seeds=(0,)),
        self_judge=dict(steps=10, check_every=5, target=0.99, n_val=20, base_negatives=1, aux=1.0, batch=16, lr=1e-3),
        self_rl={"lr": 1e-4},
        self_recipes={"main": {}, "low": {"lr": 3e-5}},
    ),
}
METHODS = ("rlvr", "rlme", "rlme_self", "rlme_10gt")
EXPERIMENTS = ("check", "judges", "main", "threshold", "mitigations", "recipe", "tradeoff", "self", "self_recipe")
FLOOR = math.log(1e-2)  # log P(yes) clamp; also the exact-match reward for a wrong answer (see label_reward)
MAX_NEW_TOKENS = 10  # " The answer is 38." + eos is 8 tokens
WATCH_MARGIN = 0.05  # label-free stop: the training judge's P(yes) gains this much on the watcher's (set a priori)


def log(*a) -> None:
    print(*a, flush=True)


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def spread(xs: list[float]) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


# --- the world every process rebuilds identically: problems, splits, tokenizer, paths ---------------
def world(size: str, out: Path, cache: Path) -> dict:
    spec = SIZES[size]
    items = T.problems()
    splits = T.split(items, seed=0, n_eval=spec["n_eval"], n_rl=spec["n_rl"])
    return {
        "size": size,
        "spec": spec,
        "items": items,
        "splits": splits,
        "val_ids": {p["id"] for p in T.split(items, seed=1, n_eval=spec["n_val"], n_rl=0)["eval"]},
        "tok": T.build_tokenizer(T.corpus(items)),
        "data": out / "rl_prompts.jsonl",
        "runs": out / "runs",
        "base": cache / f"base-{size}",
        "judge_dir": cache / f"judges-{size}",
    }


def judge_path(w: dict, seed: int, level: float | None = None) -> Path:
    """The judge of a seed at its target (level None), or its first checkpoint past a quality level."""
    d = w["judge_dir"] / f"seed-{seed}"
    return d if level is None else d / f"level-{level:g}"


def self_judging_path(w: dict) -> Path:
    return w["judge_dir"].parent / f"self-judging-base-{w['size']}"


def two_question_path(w: dict, seed: int) -> Path:
    return w["judge_dir"] / f"seed-{seed}-even"


def load(path) -> Loaded:
    """A model loaded for one use, dropped with the caller's reference (training holds its own)."""
    return ModelPool(1).get(str(path))


def weights_id(path: str) -> str:
    """The sha256 of a model directory's weights: a retrained judge at the same path is a different judge.
    Read each time (a few MB, milliseconds): no cache that a retrained file could outlive."""
    with open(Path(path) / "model.safetensors", "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_of(raw: dict, watcher: str | None) -> dict[str, str]:
    """The weights a run's curve depends on: its policy, its evaluators (not the live policy) and its watcher."""
    paths = [raw["policy"]["model"], *(e["model"] for e in raw["evaluators"]), *([watcher] if watcher else [])]
    return {p: weights_id(p) for p in paths if not p.startswith("policy")}


def cached(path: Path) -> bool:
    return (path / "bench_meta.json").is_file()


def accuracy(model, tok, items) -> tuple[float, list[str]]:
    outs = T.greedy(model, tok, [p["prompt"] for p in items], MAX_NEW_TOKENS)
    return mean([is_correct(o, p["answer"], "answer_is") for o, p in zip(outs, items)]), outs


# --- models: one base, one judge per seed ---------------------------------------------------------
def make_base(w: dict) -> dict:
    path, spec, tok, splits = w["base"], w["spec"]["policy"], w["tok"], w["splits"]
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
    meta = {"spec": spec, "history": hist, "heldout_accuracy": hist[-1]["acc"], "seconds": time.time() - t0}
    T.save(m, tok, path, meta)
    return meta


def base_samples(lm: Loaded, items: list[dict], n: int, seed: int) -> list[tuple[dict, str, bool]]:
    """n samples per problem from the base policy at temperature 1 (what RL starts from), graded by exact match."""
    prompts = [p for p in items for _ in range(n)]
    outs = T.greedy(lm.model, lm.tokenizer, [p["prompt"] for p in prompts], MAX_NEW_TOKENS, temperature=1.0, seed=seed)
    return [(p, o, is_correct(o, p["answer"], "answer_is")) for p, o in zip(prompts, outs)]


def wrong_by_problem(lm: Loaded, items: list[dict], n: int) -> dict[str, list[str]]:
    """The base's wrong answers among n samples per problem, by problem id: a judge's own-policy negatives."""
    pool: dict[str, list[str]] = {}
    for p, o, ok in base_samples(lm, items, n, 5):
        if not ok:
            pool.setdefault(p["id"], []).append(o)
    return pool


def on_samples(judge, tok, samples: list[tuple[dict, str, bool]]) -> dict:
    """The judge on graded samples: AUROC and mean P(yes) on the right and on the wrong ones."""
    py = T.judge_p_yes(judge, tok, [(p["prompt"], o) for p, o, _ in samples])
    ok = [y for _, _, y in samples]
    rep = {
        "n": len(samples),
        "share_correct": mean(ok),
        "auroc": T.auroc(py, ok),
        "p_yes_right": mean([x for x, y in zip(py, ok) if y]),
        "p_yes_wrong": mean([x for x, y in zip(py, ok) if not y]),
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rep.items()}  # JSON-comparable


def make_judge(w: dict, seed: int) -> dict:
    """Train one judge seed to the target AUROC on the validation split of the base's samples; keep the first
    checkpoint past each lower level. Its training negatives never include a validation problem's samples."""
    path, spec, tok, items = judge_path(w, seed), w["spec"]["judge"], w["tok"], w["items"]
    if cached(path):
        return json.loads((path / "bench_meta.json").read_text())
    t0 = time.time()
    base = load(str(w["base"]))  # one load for the negatives and the validation samples
    pool = wrong_by_problem(base, [p for p in items if p["id"] not in w["val_ids"]], spec["base_negatives"])
    val = base_samples(base, [p for p in items if p["id"] in w["val_ids"]], 2, 9)
    log(f"  judge seed {seed}: {sum(map(len, pool.values()))} wrong base samples as negatives, {len(val)} to validate")
    m = T.build_model(tok, spec["hidden"], spec["layers"], seed=seed, heads=spec.get("heads"))
    levels: dict[str, dict] = {}

    def on_eval(step: int, rep: dict) -> bool:
        for level in spec["levels"]:
            if f"{level:g}" not in levels and (rep["val_auroc"] or 0) >= level:
                T.save(m, tok, judge_path(w, seed, level), {"step": step, **rep})
                levels[f"{level:g}"] = {"step": step, "val_auroc": rep["val_auroc"]}
        return (rep["val_auroc"] or 0) >= spec["target"]

    curve = T.sft_judge(
        m,
        tok,
        items,
        spec["steps"],
        spec["batch"],
        spec["lr"],
        seed=seed,
        eval_fn=lambda m: {"val_auroc": on_samples(m, tok, val)["auroc"]},
        every=spec["check_every"],
        lm_first=spec["lm_first"],
        aux=spec["aux"],
        pool=pool,
        log=lambda *a: log(f"  [judge seed {seed}]", *a),
        on_eval=on_eval,
        tail=spec.get("tail", 0),
    )
    meta = {
        "seed": seed,
        "spec": spec,
        "curve": curve,
        "steps": curve[-1]["step"],
        "reached_target": (curve[-1]["val_auroc"] or 0) >= spec["target"],
        "levels": levels,
        "val": on_samples(m, tok, val),
        "report": T.judge_report(m, tok, items, seed=123, n=1000),
        "master_keys_p_yes": mean(T.judge_p_yes(m, tok, [(p["prompt"], k) for p in items[:50] for k in T.MASTER_KEYS])),
        "seconds": time.time() - t0,
    }
    T.save(m, tok, path, meta)
    return json.loads((path / "bench_meta.json").read_text())  # as a cached rerun reads it


def make_self_judging_base(w: dict) -> dict:
    """The base policy, then taught to judge as well, on its own SFT problems only (it must not learn the RL or
    held-out answers): the same recipe as a judge, its wrong samples on those problems as negatives, the answer
    loss kept on. Validated on its own samples on RL problems it never trained on, the ones it will judge."""
    path, spec, tok, splits = self_judging_path(w), w["spec"]["self_judge"], w["tok"], w["splits"]
    if cached(path):
        return json.loads((path / "bench_meta.json").read_text())
    t0 = time.time()
    lm = load(str(w["base"]))
    pool = wrong_by_problem(lm, splits["sft"], spec["base_negatives"])
    val = base_samples(lm, splits["rl"][: spec["n_val"]], 2, 9)
    log(
        f"  self-judging base: {sum(map(len, pool.values()))} of its wrong samples as negatives, {len(val)} to validate"
    )
    m = lm.model
    curve = T.sft_judge(
        m,
        tok,
        splits["sft"],
        spec["steps"],
        spec["batch"],
        spec["lr"],
        seed=0,
        eval_fn=lambda m: {
            "val_auroc": on_samples(m, tok, val)["auroc"],
            "heldout_accuracy": accuracy(m, tok, splits["eval"])[0],
        },
        every=spec["check_every"],
        lm_first=0,
        aux=spec["aux"],
        pool=pool,
        log=lambda *a: log("  [self-judging base]", *a),
        on_eval=lambda step, rep: (rep["val_auroc"] or 0) >= spec["target"],
    )
    own = base_samples(lm, splits["eval"], 2, 11)  # lm.model is m, trained in place: its own answers, unseen problems
    meta = {
        "spec": spec,
        "curve": curve,
        "steps": curve[-1]["step"],
        "heldout_accuracy": accuracy(m, tok, splits["eval"])[0],
        "val": on_samples(m, tok, val),
        "as_judge_on_own_heldout_samples": on_samples(m, tok, own),
        "seconds": time.time() - t0,
    }
    T.save(m, tok, path, meta)
    return json.loads((path / "bench_meta.json").read_text())


def make_two_question_judge(w: dict, seed: int) -> dict:
    """The first judge seed's target judge, also taught QUESTION_EVEN (task.sft_second_question); reported on
    both questions: correctness on the validation split of the base's samples, evenness on 1000 answers."""
    path, spec, tok, items = two_question_path(w, seed), w["spec"]["tradeoff"], w["tok"], w["items"]
    if cached(path):
        return json.loads((path / "bench_meta.json").read_text())
    t0 = time.time()
    m = load(str(judge_path(w, seed))).model
    T.sft_second_question(m, tok, items, T.QUESTION_EVEN, T.is_even, spec["steps"], spec["batch"], spec["lr"], 0, log)
    rng = random.Random(11)
    probs = [rng.choice(items) for _ in range(1000)]
    comps = [T.completion(p["answer"]) if rng.random() < 0.5 else T.wrong_answers(p, rng) for p in probs]
    p_even = T.judge_p_yes(m, tok, [(p["prompt"], c) for p, c in zip(probs, comps)], question=T.QUESTION_EVEN)
    val = base_samples(load(str(w["base"])), [p for p in items if p["id"] in w["val_ids"]], 2, 9)
    meta = {
        "spec": spec,
        "even_auroc": T.auroc(p_even, [T.is_even(c) for c in comps]),
        "val": on_samples(m, tok, val),
        "seconds": time.time() - t0,
    }
    T.save(m, tok, path, meta)
    return json.loads((path / "bench_meta.json").read_text())


# --- one RL run through the pipeline --------------------------------------------------------------
def config(run_id: str, method: str, seed: int, rl: dict, w: dict, judges: list[str]) -> dict:
    evaluators = {
        "rlvr": [],
        "rlme": [{"name": f"judge{k}", "model": j} for k, j in enumerate(judges)],
        "rlme_self": [{"name": "self", "model": "policy"}],
        "rlme_frozen_self": [{"name": "self", "model": "policy@initial"}],
        "rlme_10gt": [{"name": f"judge{k}", "model": j} for k, j in enumerate(judges)],
    }[method]
    label_reward = {"rlvr": {"share": 1.0}, "rlme_10gt": {"share": 0.1}}.get(method)
    cfg = {
        "run": {"id": run_id, "storage": str(w["runs"]), "iterations": rl["iterations"], "seed": seed},
        "data": {
            "path": str(w["data"]),
            "prompt_column": "question",
            "id_column": "id",
            "label_column": "answer",
            "prompts_per_iteration": rl["prompts_per_iteration"],
        },
        "policy": {"model": rl.get("policy", str(w["base"]))},
        "evaluators": evaluators,
        "questions": [{"id": "correct", "text": T.QUESTION, "positive": [" Yes"], "negative": [" No"]}]
        + (
            [
                {
                    "id": "even",
                    "text": T.QUESTION_EVEN,
                    "weight": rl["even_weight"],
                    "positive": [" Yes"],
                    "negative": [" No"],
                }
            ]
            if "even_weight" in rl
            else []
        ),
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
            "lr_decay_iterations": rl.get("lr_decay_iterations", 0),
            "micro_batch_size": rl["micro_batch"],
            "grad_accumulation": rl["grad_accumulation"],
        },
    }
    if label_reward:
        cfg["label_reward"] = label_reward
    return cfg


def probe(model, tok, judges: list[Loaded], watcher: Loaded | None, items) -> dict:
    """Held-out greedy accuracy; how far the training judges' belief in those answers exceeds the truth; and
    the watcher's belief (label-free: what a user with a second, independently seeded judge can see)."""
    acc, outs = accuracy(model, tok, items)
    pairs = [(it["prompt"], o) for it, o in zip(items, outs)]
    p = mean([mean(T.judge_p_yes(j.model, j.tokenizer, pairs)) for j in judges]) if judges else float("nan")
    row = {
        "accuracy": acc,
        "judge_p_yes": p,
        "hack_gap": p - acc,
        "well_formed": mean([o.startswith(" The answer is ") and o.endswith(".") for o in outs]),
        "even_share": mean([T.is_even(o) for o in outs]),
        "example": outs[0],
    }
    if watcher is not None:
        row["watch_p_yes"] = mean(T.judge_p_yes(watcher.model, watcher.tokenizer, pairs))
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def run_method(w: dict, run_id: str, method: str, seed: int, rl: dict, judges: list[str], watcher: str | None) -> list:
    """One RL run from the base; the held-out curve (iteration 0 is the base). A finished run's curve is kept in
    --out/curves/ with what made it, and reused by a later invocation that asks for the same run: experiments
    can be run one after another, and an interrupted sweep goes on where it stopped."""
    raw = config(run_id, method, seed, rl, w, judges)
    made_by = {"config": raw, "watcher": watcher, "weights": weights_of(raw, watcher)}
    done = w["runs"].parent / "curves" / f"{run_id}.json"
    if done.is_file() and json.loads(done.read_text())["made_by"] == made_by:
        return json.loads(done.read_text())["curve"]
    cfg = validate_config({**raw, "checkpoint": {"keep_last": 1}})  # operational: disk use flat, the newest kept
    run = Run(Store(str(w["runs"])), cfg.run.id)
    if run.store.exists("run.json"):  # a benchmark run starts from scratch
        shutil.rmtree(run.store.abs("."), ignore_errors=True)
        run = Run(Store(str(w["runs"])), cfg.run.id)
    judge_lms = [load(j) for j in judges]
    watch_lm = load(watcher) if watcher else None
    items_eval = w["splits"]["eval"]
    base = load(raw["policy"]["model"])
    curve = [{"iteration": 0, **probe(base.model, base.tokenizer, judge_lms, watch_lm, items_eval)}]
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
            **probe(lm.model, lm.tokenizer, judge_lms, watch_lm, items_eval),
            "reward_mean": m.metrics.get("reward_mean"),
            "sample_accuracy": sample_acc,
            "seconds": time.time() - t0,
        }
        curve.append(row)
        if (i + 1) % 10 == 0 or i + 1 == cfg.run.iterations:
            log(
                f"  {run_id} iter {i + 1}: acc {row['accuracy']:.3f} hack gap {row['hack_gap'] or 0:+.3f} "
                f"({row['seconds']:.0f}s)"
            )

    train(cfg, run, on_commit=on_commit)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"made_by": made_by, "curve": curve}))
    return curve


# --- work units: each runs in one thread (in a worker process when --jobs > 1) --------------------
def unit(kind: str, size: str, out: str, cache: str, args: dict):
    torch.set_num_threads(1)  # the same numbers whatever --jobs is: no thread-count-dependent reductions
    w = world(size, Path(out), Path(cache))
    if kind == "judge":
        return make_judge(w, **args)
    if kind == "two_question_judge":
        return make_two_question_judge(w, **args)
    if kind == "self_judging_base":
        return make_self_judging_base(w)
    return run_method(w, **args)


def run_units(units: list[tuple[str, dict]], jobs: int, size: str, out: Path, cache: Path) -> list:
    calls = [(kind, size, str(out), str(cache), args) for kind, args in units]
    if jobs <= 1:
        return [unit(*c) for c in calls]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        return [f.result() for f in [ex.submit(unit, *c) for c in calls]]


def plan_runs(experiments: list[str], w: dict, judges: dict, methods: list[str]) -> dict[str, dict]:
    """Every RL run the experiments need, by run id: (method, seed, rl overrides, judges, watcher)."""
    spec = w["spec"]
    jseeds = list(spec["judge_seeds"])

    def at(level, js):  # a judge seed's model at a level (None: at its target), if it got there
        if level is None:
            return str(judge_path(w, js))
        return str(judge_path(w, js, level)) if f"{level:g}" in judges[js]["levels"] else None

    def watcher(level, js):  # the next judge seed, same level: independently seeded, equally good
        return at(level, jseeds[(jseeds.index(js) + 1) % len(jseeds)]) if len(jseeds) > 1 else None

    runs: dict[str, dict] = {}

    def add(run_id, method, seed, judge_list, watch, **rl):
        if all(judge_list) and run_id not in runs:
            runs[run_id] = dict(method=method, seed=seed, rl={**spec["rl"], **rl}, judges=judge_list, watcher=watch)

    if "main" in experiments or "threshold" in experiments or "mitigations" in experiments:
        for seed in spec["seeds"]:
            if "rlvr" in methods:
                add(f"rlvr-s{seed}", "rlvr", seed, [], None)
    if "main" in experiments:
        for js in jseeds:
            for seed in spec["seeds"]:
                for method in [m for m in methods if m in ("rlme", "rlme_10gt")]:
                    add(f"{method}-j{js}-s{seed}", method, seed, [at(None, js)], watcher(None, js))
        for seed in spec["seeds"]:
            if "rlme" in methods and len(jseeds) > 1:  # evaluator configurations side by side: one judge or all
                add(f"ensemble-s{seed}", "rlme", seed, [at(None, js) for js in jseeds], None)
            if "rlme_self" in methods:
                add(f"rlme_self-s{seed}", "rlme_self", seed, [], None)
    if "threshold" in experiments:
        for level in spec["judge"]["levels"]:
            for js in jseeds:
                for seed in spec["sweep_seeds"]:
                    for method in ("rlme", "rlme_10gt") if level in spec["gt_levels"] else ("rlme",):
                        add(f"{method}-j{js}-l{level:g}-s{seed}", method, seed, [at(level, js)], watcher(level, js))
    if "mitigations" in experiments:
        for level in spec["mitigation_levels"]:
            for seed in spec["sweep_seeds"]:
                add(f"ensemble-l{level:g}-s{seed}", "rlme", seed, [at(level, js) for js in jseeds], None)
                for js in jseeds:
                    w_ = watcher(level, js)
                    add(f"rlme-j{js}-l{level:g}-s{seed}", "rlme", seed, [at(level, js)], w_)
                    add(f"kl-j{js}-l{level:g}-s{seed}", "rlme", seed, [at(level, js)], w_, beta=spec["kl_beta"])
                    add(f"pform-j{js}-l{level:g}-s{seed}", "rlme", seed, [at(level, js)], w_, reward_form="p")
    me = str(self_judging_path(w))
    if "self" in experiments:  # evaluator configurations from one base that was also taught to judge
        rl = {"policy": me, **spec["self_rl"]}
        for seed in spec["seeds"]:
            add(f"self-rlvr-s{seed}", "rlvr", seed, [], None, **rl)
            add(f"self-live-s{seed}", "rlme_self", seed, [me], None, **rl)  # judged by the policy itself
            add(f"self-frozen-s{seed}", "rlme_frozen_self", seed, [me], None, **rl)  # by its initial self
            add(f"self-other-s{seed}", "rlme", seed, [at(None, jseeds[0])], None, **rl)  # by a judge seed
    if "self_recipe" in experiments:  # the RL recipe from the self-judging base (RLVR, tuning seeds)
        for name, overrides in spec["self_recipes"].items():
            for seed in spec["recipe_seeds"]:
                add(f"self-recipe-{slug(name)}-s{seed}", "rlvr", seed, [], None, policy=me, **overrides)
    if "tradeoff" in experiments:
        for weight in spec["tradeoff"]["weights"]:
            for seed in spec["tradeoff"]["seeds"]:
                judge = [str(two_question_path(w, spec["judge_seeds"][0]))]
                add(f"tradeoff-w{weight:g}-s{seed}", "rlme", seed, judge, None, even_weight=weight)
    if "recipe" in experiments:
        for name, overrides in spec["recipes"].items():
            for seed in spec["recipe_seeds"]:
                add(f"recipe-{slug(name)}-s{seed}", "rlvr", seed, [], None, **overrides)
    return runs


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# --- report ---------------------------------------------------------------------------------------
def stats(curves: list[list[dict]], base_acc: float, rlvr_gain: float | None) -> dict:
    """Final and best held-out accuracy over runs, the gain over the base and its ratio to RLVR's gain, the
    hacking probe at the end, and the label-free stop (first iteration where the training judges' P(yes)
    exceeds the watcher's by WATCH_MARGIN; the run's last iteration otherwise)."""
    finals = [c[-1]["accuracy"] for c in curves]
    bests = [max(r["accuracy"] for r in c) for c in curves]
    out = {
        "n": len(curves),
        "final_mean": mean(finals),
        "final_spread": spread(finals),
        "best_mean": mean(bests),
        "best_spread": spread(bests),
        "best_minus_final": mean(b - f for b, f in zip(bests, finals)),
        "gain": mean(finals) - base_acc,
        "hack_gap": mean(c[-1]["hack_gap"] for c in curves if c[-1].get("hack_gap") is not None),
        "finals": finals,
    }
    if rlvr_gain and rlvr_gain > 0:
        ratios = [(f - base_acc) / rlvr_gain for f in finals]
        out["gain_vs_rlvr"], out["gain_vs_rlvr_spread"] = mean(ratios), spread(ratios)
    if all("watch_p_yes" in c[-1] for c in curves):
        stopped = [watch_stop(c) for c in curves]
        out["watch_stop_accuracy"] = mean(c[i]["accuracy"] for c, i in zip(curves, stopped))
        out["watch_stop_iteration"] = mean(c[i]["iteration"] for c, i in zip(curves, stopped))
        if rlvr_gain and rlvr_gain > 0:
            out["watch_stop_gain_vs_rlvr"] = (out["watch_stop_accuracy"] - base_acc) / rlvr_gain
    return out


def watch_stop(curve: list[dict]) -> int:
    """The iteration to keep: the last before the training judges' P(yes) pulled away from the watcher's by
    WATCH_MARGIN more than at the start. Relative to the start because two judges' calibrations differ on the
    base's answers already (by more than 0.05 for some pairs, which stopped an absolute rule at iteration 0)."""
    start = curve[0]["judge_p_yes"] - curve[0]["watch_p_yes"]
    for i, r in enumerate(curve):
        if r["judge_p_yes"] - r["watch_p_yes"] - start > WATCH_MARGIN:
            return max(i - 1, 0)  # the last checkpoint before the disagreement
    return len(curve) - 1


def group(curves: dict[str, list], prefix: str, **parts) -> list[list[dict]]:
    """The curves whose run id is `prefix` followed by the given -jJ -lL parts and any -sS."""
    want = prefix + "".join(f"-{k}{v}" for k, v in parts.items()) + "-s"
    return [c for rid, c in curves.items() if rid.startswith(want) and rid[len(want) :].isdigit()]


def paired(curves: dict[str, list], prefixes: list[str], ref: str = "rlvr") -> dict:
    """Final accuracy minus RLVR's on the same RL seed (same prompts, same sampling seeds): the seed-to-seed
    noise that both share cancels. Mean, sd and standard error over the runs."""
    diffs = []
    for rid, c in curves.items():
        stem, _, seed = rid.rpartition("-s")
        if any(stem == p for p in prefixes) and f"{ref}-s{seed}" in curves:
            diffs.append(c[-1]["accuracy"] - curves[f"{ref}-s{seed}"][-1]["accuracy"])
    sd = spread(diffs)
    return {"n": len(diffs), "mean": mean(diffs), "sd": sd, "se": sd / math.sqrt(len(diffs)) if diffs else None}


def summarize(experiments, curves, base_acc, judges, w, self_base=None) -> dict:
    spec = w["spec"]
    rlvr = group(curves, "rlvr")
    rlvr_gain = mean(c[-1]["accuracy"] for c in rlvr) - base_acc if rlvr else None
    out: dict = {"rlvr": stats(rlvr, base_acc, rlvr_gain)} if rlvr else {}
    jseeds = spec["judge_seeds"]
    if "main" in experiments:
        main: dict = {"rlvr": out.get("rlvr")}
        for method in ("rlme", "rlme_10gt"):
            every = [c for js in jseeds for c in group(curves, method, j=js)]
            if every:
                main[method] = stats(every, base_acc, rlvr_gain)
                main[method]["minus_rlvr_same_seed"] = paired(curves, [f"{method}-j{js}" for js in jseeds])
                main[method]["by_judge"] = {
                    js: stats(group(curves, method, j=js), base_acc, rlvr_gain) for js in jseeds
                }
        if group(curves, "ensemble"):
            main["rlme, ensemble of the judge seeds"] = stats(group(curves, "ensemble"), base_acc, rlvr_gain)
            main["rlme, ensemble of the judge seeds"]["minus_rlvr_same_seed"] = paired(curves, ["ensemble"])
        if group(curves, "rlme_self"):
            main["rlme_self"] = stats(group(curves, "rlme_self"), base_acc, rlvr_gain)
        out["main"] = main
    if "threshold" in experiments:
        points = []
        for level in spec["judge"]["levels"]:
            for js in jseeds:
                if f"{level:g}" not in judges[js]["levels"]:
                    continue
                row = {"level": level, "judge_seed": js, "val_auroc": judges[js]["levels"][f"{level:g}"]["val_auroc"]}
                for method in ("rlme", "rlme_10gt"):
                    runs = group(curves, method, j=js, l=f"{level:g}")
                    if runs:
                        row[method] = stats(runs, base_acc, rlvr_gain)
                points.append(row)
        out["threshold"] = points
    if "mitigations" in experiments:
        mit = {}
        for level in spec["mitigation_levels"]:
            lv = f"{level:g}"
            per = {
                "rlme": [c for js in jseeds for c in group(curves, "rlme", j=js, l=lv)],
                f"KL {spec['kl_beta']:g}": [c for js in jseeds for c in group(curves, "kl", j=js, l=lv)],
                "reward P(yes)": [c for js in jseeds for c in group(curves, "pform", j=js, l=lv)],
                "ensemble of the judge seeds": group(curves, "ensemble", l=lv),
            }
            mit[lv] = {k: stats(v, base_acc, rlvr_gain) for k, v in per.items() if v}
        out["mitigations"] = mit
    if "main" in experiments and "threshold" in experiments:  # the target judges, as points of the curve
        out["final_points"] = {
            m: [{"val_auroc": judges[js]["val"]["auroc"], **s} for js, s in out["main"][m]["by_judge"].items()]
            for m in ("rlme", "rlme_10gt")
            if m in out["main"]
        }
    if "tradeoff" in experiments:
        out["tradeoff"] = {}
        for weight in spec["tradeoff"]["weights"]:
            runs = group(curves, f"tradeoff-w{weight:g}")
            acc, even = [c[-1]["accuracy"] for c in runs], [c[-1]["even_share"] for c in runs]
            out["tradeoff"][f"{weight:g}"] = {
                "n": len(runs),
                "accuracy": mean(acc),
                "accuracy_spread": spread(acc),
                "even_share": mean(even),
                "even_share_spread": spread(even),
                "base_even_share": runs[0][0]["even_share"] if runs else None,
            }
    if "self" in experiments:  # against the self-judging base and RLVR from it
        acc0 = self_base["heldout_accuracy"]
        ref = group(curves, "self-rlvr")
        gain = mean(c[-1]["accuracy"] for c in ref) - acc0 if ref else None
        out["self"] = {"rlvr": stats(ref, acc0, gain)} if ref else {}
        for name in ("live", "frozen", "other"):
            if group(curves, f"self-{name}"):
                out["self"][name] = stats(group(curves, f"self-{name}"), acc0, gain)
                out["self"][name]["minus_rlvr_same_seed"] = paired(curves, [f"self-{name}"], ref="self-rlvr")
    if "self_recipe" in experiments:
        out["self_recipe"] = {
            name: stats(group(curves, f"self-recipe-{slug(name)}"), self_base["heldout_accuracy"], None)
            for name in spec["self_recipes"]
        }
    if "recipe" in experiments:
        out["recipe"] = {name: stats(group(curves, f"recipe-{slug(name)}"), base_acc, None) for name in spec["recipes"]}
    return out


def fmt(x, spec=".3f", sign=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+{spec}}" if sign else f"{x:{spec}}"


def tables(summary: dict, base_acc: float, judges: dict) -> str:
    md = [
        "### Judges (trained to the target on the base's own samples)",
        "",
        "| judge seed | steps | reached target | val AUROC | P(yes) right / wrong | minutes | levels (step) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for js, j in judges.items():
        lv = ", ".join(f"{k}: {v['step']}" for k, v in j["levels"].items())
        md.append(
            f"| {js} | {j['steps']} | {j['reached_target']} | {fmt(j['val']['auroc'], '.4f')} | "
            f"{fmt(j['val']['p_yes_right'])} / {fmt(j['val']['p_yes_wrong'])} | {j['seconds'] / 60:.1f} | {lv} |"
        )
    head = [
        "| method | runs | final acc (mean ± sd) | best acc | best − final | gain | gain / RLVR gain (± sd) | "
        "judge P(yes) − acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def line(name, s):
        return (
            f"| {name} | {s['n']} | {fmt(s['final_mean'])} ± {fmt(s['final_spread'])} | {fmt(s['best_mean'])} | "
            f"{fmt(s['best_minus_final'])} | {fmt(s['gain'], sign=True)} | {fmt(s.get('gain_vs_rlvr'), '.2f')}"
            f" ± {fmt(s.get('gain_vs_rlvr_spread'), '.2f')} | {fmt(s['hack_gap'], sign=True)} |"
        )

    if "main" in summary:
        md += [
            "",
            "### Main: every RL seed x every judge seed",
            "",
            *head,
            f"| base (SFT) | | {base_acc:.3f} | | | | | |",
        ]
        for k, s in summary["main"].items():
            if s:
                md.append(line(k, s))
                for js, sj in s.get("by_judge", {}).items():
                    md.append(line(f"  {k}, judge seed {js}", sj))
        pairs = [
            (k, s["minus_rlvr_same_seed"]) for k, s in summary["main"].items() if s and "minus_rlvr_same_seed" in s
        ]
        md += [
            "",
            "Final accuracy minus RLVR's on the same RL seed: "
            + "; ".join(
                f"{k} {fmt(p['mean'], sign=True)} (sd {fmt(p['sd'])}, se {fmt(p['se'])}, {p['n']} runs)"
                for k, p in pairs
            ),
        ]
    if "threshold" in summary:
        md += [
            "",
            "### Threshold: judges stopped at lower quality",
            "",
            "| level | judge seed | val AUROC | RLME gain / RLVR | RLME-10GT gain / RLVR | RLME P(yes) − acc | "
            "RLME, label-free stop |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in summary["threshold"]:
            if "rlme" not in p:  # its runs were not asked for (--methods)
                continue
            r, g = p["rlme"], p.get("rlme_10gt", {})
            md.append(
                f"| {p['level']:g} | {p['judge_seed']} | {fmt(p['val_auroc'], '.3f')} | "
                f"{fmt(r.get('gain_vs_rlvr'), '.2f')} ± {fmt(r.get('gain_vs_rlvr_spread'), '.2f')} | "
                f"{fmt(g.get('gain_vs_rlvr'), '.2f')} ± {fmt(g.get('gain_vs_rlvr_spread'), '.2f')} | "
                f"{fmt(r['hack_gap'], sign=True)} | {fmt(r.get('watch_stop_gain_vs_rlvr'), '.2f')} |"
            )
    if "mitigations" in summary:
        for lv, per in summary["mitigations"].items():
            md += ["", f"### Mitigations with judges at level {lv}", "", *head]
            md += [line(k, s) for k, s in per.items()]
            stops = [(k, s) for k, s in per.items() if "watch_stop_gain_vs_rlvr" in s]
            md += [
                f"\nLabel-free stop (watcher margin {WATCH_MARGIN}): "
                + "; ".join(
                    f"{k}: gain / RLVR {fmt(s['watch_stop_gain_vs_rlvr'], '.2f')} at iteration "
                    f"{fmt(s['watch_stop_iteration'], '.1f')}"
                    for k, s in stops
                )
            ]
    if "tradeoff" in summary:
        md += [
            "",
            "### Trade-off: reward log P(correct) + w log P(even)",
            "",
            "| w (even) | runs | held-out accuracy | share of even answers |",
            "| --- | --- | --- | --- |",
        ]
        for wt, r in summary["tradeoff"].items():
            md.append(
                f"| {wt} | {r['n']} | {fmt(r['accuracy'])} ± {fmt(r['accuracy_spread'])} | "
                f"{fmt(r['even_share'])} ± {fmt(r['even_share_spread'])} (base {fmt(r['base_even_share'])}) |"
            )
    if summary.get("self"):
        names = {
            "rlvr": "RLVR",
            "live": "RLME, live self (`policy`)",
            "frozen": "RLME, frozen self (`policy@initial`)",
            "other": "RLME, frozen other (judge seed 1)",
        }
        md += ["", "### Evaluator configurations, from a base also taught to judge", "", *head]
        md += [line(names[k], s) for k, s in summary["self"].items()]
        md += [
            "",
            "Final accuracy minus RLVR's (from the same base) on the same RL seed: "
            + "; ".join(
                f"{names[k]} {fmt(p['mean'], sign=True)} (se {fmt(p['se'])}, {p['n']} runs)"
                for k, s in summary["self"].items()
                if (p := s.get("minus_rlvr_same_seed"))
            ),
        ]
    if "recipe" in summary:
        md += ["", "### RL recipe (RLVR, tuning seeds)", "", *head]
        md += [line(k, s) for k, s in summary["recipe"].items()]
    if "self_recipe" in summary:
        md += ["", "### RL recipe from the self-judging base (RLVR, tuning seeds)", "", *head]
        md += [line(k, s) for k, s in summary["self_recipe"].items()]
    return "\n".join(md)


def pyplot():
    """matplotlib's pyplot on a file backend, or None (said once per plot) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'rlme[bench]'): no plot")
        return None
    return plt


def saved(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot(curves: dict, summary: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    panels = 4 if summary.get("threshold") else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    keys = [
        ("accuracy", "held-out greedy accuracy"),
        ("reward_mean", "mean training reward (log P(yes) units)"),
        ("hack_gap", "hacking probe: judge P(yes) − accuracy"),
    ]
    methods = {
        m: group(curves, m) + [c for rid, c in curves.items() if rid.startswith(f"{m}-j") and "-l" not in rid]
        for m in ("rlvr", "rlme", "rlme_10gt", "rlme_self")
    }
    for ax, (key, title) in zip(axes, keys):
        for color, (method, runs) in zip(("C0", "C1", "C2", "C3"), methods.items()):
            if not runs:
                continue
            n = min(len(c) for c in runs)
            pts = [(runs[0][i]["iteration"], [c[i].get(key) for c in runs]) for i in range(n)]
            pts = [(x, v) for x, v in pts if all(u is not None for u in v)]
            if not pts:
                continue
            x, m, s = [p[0] for p in pts], [mean(v) for _, v in pts], [spread(v) for _, v in pts]
            ax.plot(x, m, color=color, label=f"{method} ({len(runs)} runs)")
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if panels == 4:
        ax = axes[3]
        for method, color in (("rlme", "C1"), ("rlme_10gt", "C2")):
            pts = [(p["val_auroc"], p[method].get("gain_vs_rlvr")) for p in summary["threshold"] if method in p]
            pts += [(j["val_auroc"], j.get("gain_vs_rlvr")) for j in summary.get("final_points", {}).get(method, [])]
            pts = sorted((a, g) for a, g in pts if a is not None and g is not None)
            ax.plot([a for a, _ in pts], [g for _, g in pts], "o", color=color, label=method)
        ax.axhline(0.8, color="grey", ls="--", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_title("RLME gain / RLVR gain vs judge AUROC (base samples)", fontsize=10)
        ax.set_xlabel("judge AUROC on the base policy's own samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return saved(fig, path)


def plot_judges(judges: dict, path: Path) -> bool:
    """Each judge seed's validation AUROC (the base policy's own samples) against its training step."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for js, j in judges.items():
        pts = [(r["step"], r["val_auroc"]) for r in j["curve"] if r.get("val_auroc") is not None]
        ax.plot([s for s, _ in pts], [a for _, a in pts], marker=".", label=f"judge seed {js}")
    if judges:
        target = next(iter(judges.values()))["spec"]["target"]
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target}")
    ax.set_xlabel("judge SFT step")
    ax.set_ylabel("AUROC on the base policy's samples (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return saved(fig, path)


# --- main -----------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--experiments", default="check", help=f"comma-separated, of {','.join(EXPERIMENTS)}")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--seeds", help="RL seeds, comma-separated (default: the size's)")
    ap.add_argument("--judge-seeds", help="judge seeds, comma-separated (default: the size's)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--jobs", type=int, default=2, help="worker processes, one thread each (results do not depend on it)"
    )
    args = ap.parse_args(argv)
    t_start = time.time()
    experiments = [e for e in args.experiments.split(",") if e]
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad:
        ap.error(f"--experiments: unknown {bad}; choose from {', '.join(EXPERIMENTS)}")
    spec = dict(SIZES[args.size])
    if args.seeds:
        spec["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.judge_seeds:
        spec["judge_seeds"] = tuple(int(s) for s in args.judge_seeds.split(","))
    if "check" in experiments:  # the default: `main` with one judge seed, under 45 minutes cold on 2 cores
        experiments = list(dict.fromkeys("main" if e == "check" else e for e in experiments))
        spec["judge_seeds"] = spec["judge_seeds"] if args.judge_seeds else spec["judge_seeds"][:1]
    args.out.mkdir(parents=True, exist_ok=True)
    w = {**world(args.size, args.out, args.cache), "spec": spec}
    w["data"].write_text(
        "".join(
            json.dumps({"id": p["id"], "question": p["prompt"], "answer": p["answer"]}) + "\n"
            for p in w["splits"]["rl"]
        )
    )

    torch.set_num_threads(1)
    log(f"[{time.time() - t_start:.0f}s] base policy: SFT on {len(w['splits']['sft'])} problems, early stop")
    base_meta = make_base(w)
    methods = [m for m in args.methods.split(",") if m]
    judged = {"rlme", "rlme_10gt"} & set(methods)
    judges = {}
    if {"judges", "threshold", "mitigations", "tradeoff", "self"} & set(experiments) or (
        "main" in experiments and judged
    ):
        log(
            f"[{time.time() - t_start:.0f}s] judges {spec['judge_seeds']}: SFT on all {len(w['items'])} problems to "
            f"AUROC {spec['judge']['target']} on the base's samples (cached in {w['judge_dir']})"
        )
        units = [("judge", {"seed": js}) for js in spec["judge_seeds"]]
        # all judges at once when running in parallel at all: 3 judges on 2 cores finish in half their summed
        # time, where 2-then-1 waits for the last one alone
        jobs = len(units) if args.jobs > 1 else 1
        judges = dict(zip(spec["judge_seeds"], run_units(units, jobs, args.size, args.out, args.cache)))
    two_question = None
    if "tradeoff" in experiments:
        unit_ = ("two_question_judge", {"seed": spec["judge_seeds"][0]})
        (two_question,) = run_units([unit_], 1, args.size, args.out, args.cache)
        log(f"  two-question judge: {two_question}")
    self_base = None
    if {"self", "self_recipe"} & set(experiments):
        (self_base,) = run_units([("self_judging_base", {})], 1, args.size, args.out, args.cache)
        log(
            f"  self-judging base: {self_base['steps']} steps, held-out accuracy {self_base['heldout_accuracy']:.3f}, "
            f"as a judge of its own held-out samples {self_base['as_judge_on_own_heldout_samples']}"
        )
    for js, j in judges.items():
        log(f"  judge seed {js}: {j['steps']} steps, val {j['val']}, levels {j['levels']}")
    t_models = time.time() - t_start

    base_lm = load(str(w["base"]))
    base_acc, _ = accuracy(base_lm.model, base_lm.tokenizer, w["splits"]["eval"])
    base_as_judge = T.judge_report(base_lm.model, base_lm.tokenizer, w["items"], seed=123, n=400)
    log(f"  base held-out accuracy {base_acc:.3f}; the base as a judge: {base_as_judge}")
    skipped = {}
    if "rlme_self" in methods and base_as_judge["auroc"] < 0.6:
        methods.remove("rlme_self")
        skipped["rlme_self"] = (
            f"the base cannot judge (AUROC {base_as_judge['auroc']:.2f} < 0.6): live self has no signal"
        )
        log(f"  skip rlme_self: {skipped['rlme_self']}")

    runs = plan_runs(experiments, w, judges, methods)
    log(f"[{time.time() - t_start:.0f}s] {len(runs)} RL runs, {args.jobs} at a time")
    t_rl = time.time()
    # the slowest first (ensembles score with every judge), so the pool does not end on one long run
    order = sorted(runs, key=lambda r: -len(runs[r]["judges"]))
    results = run_units([("rl", {"run_id": r, **runs[r]}) for r in order], args.jobs, args.size, args.out, args.cache)
    curves = dict(sorted(zip(order, results)))
    t_rl = time.time() - t_rl

    summary = summarize(experiments, curves, base_acc, judges, w, self_base)
    wall = time.time() - t_start
    result = {
        "size": args.size,
        "experiments": experiments,
        "spec": spec,
        "skipped": skipped,
        "judges": judges,
        "two_question_judge": two_question,
        "self_judging_base": self_base,
        "base": {"heldout_accuracy": base_acc, "as_judge": base_as_judge, "sft": base_meta},
        "summary": summary,
        "runs": runs,
        "curves": curves,
        "seconds": {"total": wall, "models (SFT, 0 when cached)": t_models, "rl": t_rl},
        "command": "PYTHONPATH=. python benchmarks/paper_mini/bench.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = tables(summary, base_acc, judges)
    (args.out / "results.md").write_text(
        f"{md}\n\nBase held-out accuracy {base_acc:.3f}; base as a judge: AUROC {base_as_judge['auroc']:.3f}.\n"
        f"{len(runs)} RL runs x {spec['rl']['iterations']} iterations; wall time {wall / 60:.1f} min "
        f"(models {t_models / 60:.1f} min, RL {t_rl / 60:.1f} min, {args.jobs} jobs).\n"
    )
    plot(curves, summary, args.out / "curves.png")
    plot_judges(judges, args.out / "judges.png")
    log(md)
    log(f"wall time {wall:.0f}s (models {t_models:.0f}s, RL {t_rl:.0f}s); results in {args.out}")
    return result


if __name__ == "__main__":
    main()
