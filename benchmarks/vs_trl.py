"""rlme versus TRL's GRPOTrainer on the same tiny models, prompts and hyper-parameters, side by side.

    pip install -e '.[bench]'     # TRL pinned as a benchmark-only extra
    PYTHONPATH=. python -m benchmarks.vs_trl [--steps 4] [--repeats 2] [--configs k1,k4,k8,large] [--tiny]

One pair of models (policy, evaluator) is built once per configuration; then, alternating and repeated,
each in a fresh subprocess:
  (a) TRL GRPOTrainer, loss_type="cispo", beta=0, epsilon_high=5, scale_rewards="none" (Dr. GRPO advantages),
      one reward function per meta-question that runs the evaluator forward on "prompt + completion +
      question" and returns max(log P(yes), floor), with reward_weights = the question weights;
  (b) `rlme_pipeline.jobs.train.train` (what `rlme train` runs, minus Prefect: see benchmarks/orchestration.py)
      with the same prompts (8 per iteration, chat template), G, max new tokens, temperature, learning
      rate, micro-batch x accumulation (one optimizer step per iteration), evaluator, template and questions,
      writing every artifact (rollouts/scores/rewards Parquet, safetensors checkpoint + optimizer, manifest).
Reported per configuration, medians over the pairs:
  steady s/iter   median wall of iterations 2..N (what a long run costs per iteration; artifacts included);
  process s/iter  wall from the process's start to its last iteration, divided by N: interpreter start-up,
                  every import (TRL's and ours) and model loading included, so each side pays its own;
  CPU ratio       user+system seconds of the whole process, all threads (less sensitive to neighbours);
  peak RSS        VmHWM of each subprocess; and the reward mean at the last step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, emit, machine, median, process_seconds, run_case, spread, table, vm_kib

QUESTIONS = [
    "Is the answer correct?",
    "Does the whole solution logically lead from the question to an answer?",
    "Is the final answer stated clearly?",
    "Is the arithmetic right?",
    "Does the response answer the question that was asked?",
    "Is the response concise?",
    "Is every step justified?",
    "Is the response complete?",
]
HP = dict(prompts=8, group_size=4, max_new_tokens=24, temperature=1.0, lr=1e-4, micro=8, accum=4)
CONFIGS = {
    "k1": dict(k=1, large=False),
    "k4": dict(k=4, large=False),
    "k8": dict(k=8, large=False),
    "large": dict(k=4, large=True),
}


def build_models(out: Path, large: bool) -> dict[str, str]:
    from rlme_pipeline.models.tiny import build_model, build_tokenizer, make_tiny

    paths = make_tiny(out / "tiny")
    if not large:
        return {k: str(v) for k, v in paths.items()}
    pol = out / "policy-512x4"
    if not (pol / "model.safetensors").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = build_tokenizer()
        base = build_model(tok, "policy", 0).config.to_dict()
        base.update(
            hidden_size=512,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=1024,
            num_hidden_layers=4,
        )
        torch.manual_seed(7)
        LlamaForCausalLM(LlamaConfig(**base)).save_pretrained(pol)
        tok.save_pretrained(pol)
    return {"policy": str(pol), "evaluator": str(paths["evaluator"])}


def job_of(c: dict) -> dict:
    """The job's hyper-parameters: HP, with a case's own `job` overrides (benchmarks/gpu.py sizes)."""
    return {**HP, **c.get("job", {})}


def rlme_config(c: dict, storage: str) -> dict:
    """The job as an rlme config; a case may add a `checkpoint` section (full_every, background_write,
    keep_last) and a generation `backend` (benchmarks/gpu.py variants)."""
    j = job_of(c)
    device, dtype = c.get("device", "cpu"), c.get("dtype", "float32")
    return {
        "run": {"id": "bench", "storage": storage, "iterations": c["steps"], "seed": 0},
        "data": {
            "path": str(ROOT / "data" / "demo_prompts.jsonl"),
            "prompt_column": "question",
            "id_column": "id",
            "prompts_per_iteration": j["prompts"],
        },
        "policy": {"model": c["policy"], "dtype": dtype, "device": device},
        "evaluators": [{"name": "ev", "model": c["evaluator"], "weight": 1.0, "dtype": dtype, "device": device}],
        "questions": [{"id": f"q{i}", "text": QUESTIONS[i], "weight": 1.0} for i in range(c["k"])],
        "generation": {
            "group_size": j["group_size"],
            "max_new_tokens": j["max_new_tokens"],
            "temperature": j["temperature"],
            "batch_size": j.get("generation_batch", 32),
            "backend": c.get("backend", "hf"),
        },
        "checkpoint": c.get("checkpoint", {}),
        "scoring": {"batch_size": j.get("scoring_batch", 16), "reward_form": "logp"},
        "algorithm": {"loss": "cispo", "eps_high": 5.0, "beta": 0.0},
        "optimizer": {"lr": j["lr"], "micro_batch_size": j["micro"], "grad_accumulation": j["accum"]},
    }


class OverBudget(Exception):
    """Raised after a commit once the case's process has run `budget` seconds: the case reports the
    iterations it made instead of being killed with nothing to show."""


def over_budget(c: dict, done: int) -> bool:
    """Whether to stop after `done` iterations: the process has run the case's `budget` seconds (start-up
    included) and at least 3 iterations are done (2 intervals for a steady time)."""
    return bool(c.get("budget")) and done >= 3 and process_seconds() > c["budget"]


def run_rlme(c: dict) -> dict:
    """`runner.train` on the job; per iteration: commit time, stage seconds, generated tokens, and the
    seconds spent writing the checkpoint (checkpoint.save in the update stage, or the background writer)."""
    from rlme_pipeline.config import Config
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.models import checkpoint
    from rlme_pipeline.storage.run import Run

    cfg = Config.model_validate(rlme_config(c, c["storage"]))
    stamps, stages, saves, rewards = [], [], [], []
    save = checkpoint.save

    def timed_save(*a, **k):
        t = time.perf_counter()
        out = save(*a, **k)
        saves.append(time.perf_counter() - t)
        return out

    def committed(m):
        stamps.append(time.perf_counter())
        rewards.append(m.metrics["reward_mean"])
        rollouts = cfg.data.prompts_per_iteration * cfg.generation.group_size
        # background_write: the rollouts were sampled before the commit of i-1 (sampled_ahead_seconds; the
        # generate stage only writes them) and the checkpoint by the writer thread, not checkpoint.save
        ahead = m.metrics.get("sampled_ahead_seconds", 0.0)
        stages.append(
            {
                **m.timings,
                "generate": m.timings["generate"] + ahead,
                "checkpoint": m.metrics.get("checkpoint_write_seconds", saves[-1] if saves else 0.0),
                **({"checkpoint_wait": w} if (w := m.metrics.get("checkpoint_wait_seconds")) is not None else {}),
                "tokens": m.metrics["completion_tokens_mean"] * rollouts,
            }
        )
        if over_budget(c, len(stamps)):
            raise OverBudget

    checkpoint.save = timed_save
    try:
        t0 = time.perf_counter()
        try:
            train(cfg, Run.for_config(cfg), on_commit=committed)
        except OverBudget:
            pass
        total = time.perf_counter() - t0
    finally:
        checkpoint.save = save
    return {
        "seconds": total,
        "stamps": [s - t0 for s in stamps],
        "stages": stages,
        "reward_mean": rewards[-1],
    }


def run_trl(c: dict) -> dict:
    """TRL's GRPOTrainer on the same job; per step: generation and reward seconds (its `_generate` and
    `_calculate_rewards`, timed around the call) and generated tokens."""
    import datasets
    import polars as pl
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlme_pipeline.config import DEFAULT_QUESTION_TEMPLATE, DEFAULT_TEMPLATE
    from rlme_pipeline.judging.judges import answer_ids
    from rlme_pipeline.models.loading import DTYPES

    t0 = time.perf_counter()
    j = job_of(c)
    device, dtype = c.get("device", "cpu"), c.get("dtype", "float32")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    floor = math.log(1e-6)
    ev_tok = AutoTokenizer.from_pretrained(c["evaluator"])
    ev = AutoModelForCausalLM.from_pretrained(c["evaluator"], dtype=DTYPES[dtype]).to(device).eval()
    yes = answer_ids(ev_tok, [" Yes", "Yes"], "yes")

    def make_reward(question: str):
        q = DEFAULT_QUESTION_TEMPLATE.format(question=question)

        @torch.no_grad()
        def reward(prompts, completions, question_text, **kw):
            texts = [
                DEFAULT_TEMPLATE.format(prompt=p, completion=cm[0]["content"]) + q
                for p, cm in zip(question_text, completions)
            ]
            enc = [ev_tok(t)["input_ids"] for t in texts]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), ev_tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for r, e in enumerate(enc):  # left padding: the last position is each row's next-token slot
                ids[r, width - len(e) :], mask[r, width - len(e) :] = torch.tensor(e), 1
            ids, mask = ids.to(device), mask.to(device)
            logits = (
                ev(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=1,
                )
                .logits[:, -1]
                .float()
            )
            lp = torch.logsumexp(torch.log_softmax(logits, -1)[:, yes], -1)
            return [max(float(x), floor) for x in lp.cpu()]

        reward.__name__ = f"logp_yes_q{len(question)}"
        return reward

    rows = pl.read_ndjson(ROOT / "data" / "demo_prompts.jsonl").to_dicts()
    ds = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "question_text": r["question"]} for r in rows]
    )
    args = GRPOConfig(
        output_dir=c["storage"],
        loss_type="cispo",
        beta=0.0,
        epsilon_high=5.0,
        scale_rewards="none",
        num_generations=j["group_size"],
        max_completion_length=j["max_new_tokens"],
        temperature=j["temperature"],
        learning_rate=j["lr"],
        per_device_train_batch_size=j["micro"],
        gradient_accumulation_steps=j["accum"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=c["steps"],
        num_iterations=1,
        reward_weights=[1.0] * c["k"],
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        report_to="none",
        # save: None (nothing), "full" (model + optimizer + scheduler + RNG every step) or "model" (weights
        # only every step); the last 2 checkpoints kept, as rlme's variants keep_last: 2
        save_strategy="steps" if c.get("save") else "no",
        save_steps=1,
        save_only_model=c.get("save") == "model",
        save_total_limit=2,
        # vllm: generation by a vLLM engine colocated in the trainer's process (TRL's other vLLM settings
        # at their defaults: gpu_memory_utilization 0.3, no sleep mode)
        use_vllm=bool(c.get("vllm")),
        vllm_mode="colocate",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    stamps, spent = [], {"generate": [], "score": []}

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            stamps.append(time.perf_counter())
            if over_budget(c, len(stamps)):
                control.should_training_stop = True  # the step's own save (save_steps=1) still happens

    trainer = GRPOTrainer(
        model=c["policy"],
        reward_funcs=[make_reward(QUESTIONS[i]) for i in range(c["k"])],
        args=args,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(c["policy"]),
        callbacks=[Stamp()],
    )

    def timed(name, fn):
        def call(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spent[name].append(time.perf_counter() - t)
            return out

        return call

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer.train()
    total = time.perf_counter() - t0
    history = [h for h in trainer.state.log_history if "reward" in h]
    rollouts = j["prompts"] * j["group_size"]
    stages = [
        {"generate": g, "score": r, "tokens": h.get("completions/mean_length", 0.0) * rollouts}
        for g, r, h in zip(spent["generate"], spent["score"], history)
    ]
    return {
        "seconds": total,
        "stamps": [s - t0 for s in stamps],
        "stages": stages,
        "reward_mean": history[-1]["reward"] if history else None,
    }


def case(c: dict) -> dict:
    r = run_rlme(c) if c["impl"] == "rlme" else run_trl(c)
    st = r["stamps"]
    steady = median([b - a for a, b in zip(st, st[1:])]) if len(st) > 1 else r["seconds"]
    out = {
        **r,
        "steps": len(st),
        "per_iter": process_seconds() / max(len(st), 1),
        "steady": steady,
        "peak_mib": vm_kib("VmHWM") / 1024,
        "process_cpu": sum(os.times()[:2]),
        # benchmarks/gpu.py runs where neither is installed: the library loop must need neither
        "prefect_imported": "prefect" in sys.modules,
        "s3fs_imported": "s3fs" in sys.modules,
    }
    if c.get("device", "cpu").startswith("cuda"):
        import torch

        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["card"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="k1,k4,k8,large")
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: K = 1, 2 steps, one repeat")
    a = ap.parse_args()
    if a.case:
        emit(case(json.loads(a.case)))
        return
    if a.tiny:
        a.steps, a.repeats, a.configs = 2, 1, "k1"
    results = []
    with tempfile.TemporaryDirectory(prefix="rlme-bench-trl-") as tmp:
        for name in a.configs.split(","):
            spec = CONFIGS[name]
            models = build_models(Path(tmp) / "models", spec["large"])
            res = {"rlme": [], "trl": []}
            for r in range(a.repeats):
                for impl in ("rlme", "trl") if r % 2 == 0 else ("trl", "rlme"):
                    res[impl].append(
                        run_case(
                            "benchmarks.vs_trl",
                            {
                                "impl": impl,
                                "k": spec["k"],
                                "steps": a.steps,
                                **models,
                                "storage": os.path.join(tmp, f"{name}-{impl}-{r}"),
                            },
                        )
                    )
            results.append((name, spec, res))
    rows = []
    for name, spec, res in results:
        R, T = res["rlme"], res["trl"]

        def both(key, R=R, T=T):
            return [
                median([x[key] for x in R]),
                median([x[key] for x in T]),
                median([x[key] / y[key] for x, y in zip(R, T)]),
            ]

        rows.append(
            [
                f"{name} (K={spec['k']}{', policy 512x4' if spec['large'] else ''})",
                *both("steady"),
                *both("per_iter"),
                both("process_cpu")[2],
                median([x["peak_mib"] for x in R]),
                median([x["peak_mib"] for x in T]),
                median([x["reward_mean"] for x in R]),
                median([x["reward_mean"] for x in T]),
                spread([x["steady"] for x in R + T]),
            ]
        )
    print(
        f"rlme vs TRL GRPOTrainer (cispo, beta 0): {a.steps} iterations per run, {HP['prompts']} prompts x G={HP['group_size']}, "
        f"{HP['max_new_tokens']} new tokens, lr {HP['lr']}, one optimizer step (8 x 4) per iteration; fresh subprocess per "
        f"case, alternating, median of {a.repeats} pairs"
    )
    print(f"machine: {machine()}")
    print(
        table(
            [
                "config",
                "rlme steady s/iter",
                "TRL steady s/iter",
                "steady ratio rlme/TRL",
                "rlme process s/iter",
                "TRL process s/iter",
                "process ratio",
                "CPU ratio",
                "rlme peak MiB",
                "TRL peak MiB",
                f"rlme reward@{a.steps}",
                f"TRL reward@{a.steps}",
                "steady spread",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
