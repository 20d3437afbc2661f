"""rlme versus TRL's GRPOTrainer at GPU sizes: one card, bf16, full fine-tuning, the same job, alternating.

    make bench-gpu                                   # or: PYTHONPATH=. python -m benchmarks.gpu
    PYTHONPATH=. python -m benchmarks.gpu --configs pair --variants rlme-full1,trl-save1-full --repeats 3
    PYTHONPATH=. python -m benchmarks.gpu --dry-cpu  # tiny shapes on the CPU (the test suite runs this)

Models are built offline from configs with random weights (nothing is downloaded), in fp32 files as a
training run starts from, so both trainers keep fp32 master weights and compute in bf16:
  pair    a ~194M Llama policy and a ~277M Qwen2 evaluator (hidden 1024, untied embeddings) with rlme's own
          2,048-token tokenizer (rlme_pipeline/models/tiny.py): the pair of issue 14;
  qwen05  a Qwen2.5-0.5B-shaped policy (494M: hidden 896, 24 layers, 14 heads / 2 KV heads, tied embeddings)
          and the pair's evaluator, both with a 151,936-token vocabulary: rlme's tokenizer padded with
          filler tokens to Qwen's size, so every id the models can sample decodes.
The job (issue 14): 16 prompts x G=8, 128 new tokens, K=4 questions (each reward = the evaluator's
log P(yes)), micro-batch 32 x 4 accumulation = one optimizer step per iteration, CISPO, beta 0.
  rlme   `runner.train` (no Prefect), policy and evaluator `dtype: bfloat16` on the card, hf backends,
         every artifact written to local storage (rollouts/scores/rewards Parquet, checkpoint, manifest);
  TRL    GRPOTrainer(loss_type="cispo", beta=0, bf16=True, epsilon_high=5, scale_rewards="none", its
         defaults otherwise), one reward function per question (benchmarks/vs_trl.py, shared code).
Variants (VARIANTS below, one table): rlme with checkpoint.full_every 1, 10, and 10 written in the
background; TRL saving nothing, saving everything every step (save_steps=1) and the weights every step
(save_only_model); with vLLM importable, both with a colocated vLLM engine (skipped with a printed line
otherwise). Defaults: 3 pairs x 8 iterations per case, every variant once per pair, alternating (reversed in
odd pairs), each case in a fresh subprocess with a time budget per configuration (CONFIGS: a case starts no
further iteration once it has run its budget and made 3, and reports what it made), the case's storage deleted
after it. Each configuration's tables print as soon as it is measured, one line per case on stderr before.
Reported per variant: steady s/iteration (median interval between iterations 2..N), the stage breakdown
(medians over the same iterations; TRL's update is its step time minus generation and rewards, its save
included), generated tokens/s during generation, the peak GPU memory allocated by torch (peak RSS with
--dry-cpu); then the rlme/TRL ratios of like-for-like variants (RATIOS: per pair, and their median), and
the card.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import machine, median, run_case, table

QWEN_VOCAB = 151_936
POLICY_LLAMA = dict(
    arch="llama",
    hidden_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=2496,
    tie_word_embeddings=False,
)
EVALUATOR_QWEN2 = dict(
    arch="qwen2",
    hidden_size=1024,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=3072,
    tie_word_embeddings=False,
)
POLICY_QWEN05 = dict(
    arch="qwen2",
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128)
# budget: seconds a case may run (start-up included) before it starts no further iteration; sized for 8
# iterations of the slowest variant with room (H200, issue 14: the pair's TRL steps 2.9 s, rlme's 5.1 s with
# the full state written; the qwen05 TRL steps 8.2 s, rlme writes 6 GB per full state)
CONFIGS = {
    "pair": dict(policy=POLICY_LLAMA, evaluator=EVALUATOR_QWEN2, vocab=None, budget=100),
    "qwen05": dict(policy=POLICY_QWEN05, evaluator=EVALUATOR_QWEN2, vocab=QWEN_VOCAB, budget=200),
}
# What is compared, in the order a pair of cases runs them (odd pairs reverse it), each in its own process.
# rlme always commits a checkpoint per iteration (what re-score and audit read); `checkpoint` says how much.
# Both sides keep their last 2 checkpoints (rlme keep_last: 2, TRL save_total_limit=2).
KEEP = {"keep_last": 2}
VARIANTS = {
    "rlme-full1": dict(
        impl="rlme",
        checkpoint={"full_every": 1, **KEEP},
        what="rlme, checkpoint.full_every 1: fp32 weights + AdamW state every iteration, on the critical path",
    ),
    "trl-save1-full": dict(
        impl="trl",
        save="full",
        what='TRL, save_strategy="steps", save_steps=1: model + optimizer + scheduler + RNG every step',
    ),
    "rlme-full10": dict(
        impl="rlme",
        checkpoint={"full_every": 10, **KEEP},
        what="rlme, checkpoint.full_every 10: the weights every iteration, the full state every 10th and the last",
    ),
    "trl-save1-model": dict(
        impl="trl",
        save="model",
        what='TRL, save_strategy="steps", save_steps=1, save_only_model=True: the weights every step',
    ),
    "rlme-full10-bg": dict(
        impl="rlme",
        checkpoint={"full_every": 10, "background_write": True, **KEEP},
        what="rlme, full_every 10 + checkpoint.background_write: written while the next iteration samples",
    ),
    "trl-nosave": dict(impl="trl", what='TRL, save_strategy="no": nothing written (issue 14\'s comparison)'),
    "rlme-vllm-full10": dict(
        impl="rlme",
        backend="vllm",
        vllm=True,
        checkpoint={"full_every": 10, **KEEP},
        what="rlme, generation.backend vllm (colocated, weights pushed in memory), full_every 10",
    ),
    "trl-vllm-nosave": dict(
        impl="trl",
        vllm=True,
        what='TRL, use_vllm=True, vllm_mode="colocate" (its defaults otherwise), save_strategy="no"',
    ),
}
# The ratios printed per configuration: (rlme variant, TRL variant, what the two have alike)
RATIOS = [
    ("rlme-full1", "trl-save1-full", "both write the full state every step"),
    ("rlme-full10", "trl-save1-model", "both write the weights every step (rlme the full state every 10th too)"),
    ("rlme-full10-bg", "trl-save1-model", "the same, rlme writing beside the next iteration's sampling"),
    ("rlme-full1", "trl-nosave", "rlme's full state every step against TRL writing nothing"),
    ("rlme-full10-bg", "trl-nosave", "rlme's lightest checkpointing against TRL writing nothing"),
    ("rlme-vllm-full10", "trl-vllm-nosave", "both generating with vLLM colocated"),
    ("rlme-vllm-full10", "trl-nosave", "rlme with vLLM against TRL without"),
]
JOB = dict(
    prompts=16,
    group_size=8,
    max_new_tokens=128,
    temperature=1.0,
    lr=1e-6,
    micro=32,
    accum=4,
    generation_batch=128,
    scoring_batch=64,
)
DRY_JOB = dict(
    prompts=2,
    group_size=2,
    max_new_tokens=6,
    temperature=1.0,
    lr=1e-6,
    micro=2,
    accum=2,
    generation_batch=4,
    scoring_batch=4,
)


def tokenizer(vocab: int | None):
    """rlme's own tokenizer; with `vocab`, padded with filler tokens (ordinary vocabulary entries that no
    text encodes to, each decoding to its own name) so that len(tokenizer) == vocab."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from rlme_pipeline.models.tiny import build_tokenizer

    tok = build_tokenizer()
    if vocab is None or vocab == len(tok):
        return tok
    spec = json.loads(tok.backend_tokenizer.to_str())
    n = len(tok)
    spec["model"]["vocab"].update({f"<|filler_{i}|>": n + i for i in range(vocab - n)})
    wide = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        padding_side="left",
        model_max_length=tok.model_max_length,
        chat_template=tok.chat_template,
    )
    assert len(wide) == vocab, (len(wide), vocab)
    return wide


def build(out: Path, shape: dict, tok, seed: int, dry: bool) -> str:
    """An fp32 HF directory with random weights of `shape` (TINY sizes with --dry-cpu), built on the card
    when there is one (initialising 500M parameters on a CPU is slow), once per output directory."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if (out / "model.safetensors").exists():
        return str(out)
    arch = {**shape, **(TINY if dry else {})}
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        arch.pop("arch")
    ]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = config_cls(vocab_size=len(tok), max_position_embeddings=4096, dtype="float32", **ids, **arch)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_cls(config).to(torch.float32)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the cases run in their own processes: leave them the card
    return str(out)


def build_models(root: Path, name: str, dry: bool) -> dict[str, str]:
    spec = CONFIGS[name]
    tok = tokenizer(spec["vocab"])
    suffix = "-dry" if dry else ""
    return {
        "policy": build(root / f"{name}-policy{suffix}", spec["policy"], tok, 1, dry),
        "evaluator": build(root / f"{name}-evaluator{suffix}", spec["evaluator"], tok, 2, dry),
    }


def n_params(path: str) -> float:
    from safetensors import safe_open

    with safe_open(Path(path) / "model.safetensors", "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def trl_missing() -> str | None:
    gone = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    return f"{', '.join(gone)} not installed (pip install -e '.[bench]')" if gone else None


def steady_stages(r: dict) -> dict:
    """Medians over the iterations after the first (warm-up: CUDA kernels, allocator, lazy imports)."""
    its = r["stages"][1:] or r["stages"]
    keys = {k for it in its for k in it}
    return {k: median([it[k] for it in its if k in it]) for k in keys}


def row(variant: str, rs: list[dict], steps: int, dry: bool) -> list:
    """One variant's line of a configuration's table: medians over its cases that finished."""
    ok = [r for r in rs if "error" not in r]
    errors = [r["error"] for r in rs if "error" in r]
    if not ok:
        return [variant, f"0 of {len(rs)}: {errors[0] if errors else 'not run'}"] + [None] * 11
    st = [steady_stages(r) for r in ok]
    gen, score = median([s["generate"] for s in st]), median([s["score"] for s in st])
    steady = median([r["steady"] for r in ok])
    if VARIANTS[variant]["impl"] == "rlme":
        update = median([s["update"] + s.get("aggregate", 0.0) for s in st])
        ckpt = median([s["checkpoint"] for s in st])
        waited = median([s["checkpoint_wait"] for s in st]) if "checkpoint_wait" in st[0] else None
    else:
        update, ckpt, waited = steady - gen - score, None, None
    mem = [r["peak_mib"] / 1024 for r in ok] if dry else [r["gpu_peak_mib"] / 1024 for r in ok]
    return [
        variant,
        f"{len(ok)} of {len(rs)}" + (f" ({errors[0]})" if errors else ""),
        "/".join(sorted({str(r["steps"]) for r in ok})) + f" of {steps}",
        steady,
        gen,
        score,
        update,
        ckpt,
        waited,
        median([s["tokens"] / s["generate"] for s in st if s["generate"]]),
        median(mem),
        median([r["reward_mean"] for r in ok]),
        median([r["per_iter"] for r in ok]),
    ]


def ratio_rows(res: dict[str, list[dict]]) -> list[list]:
    """rlme/TRL steady s/iter for each like-for-like pair of variants that both ran: per pair of cases
    measured side by side (the same repeat), then the median over pairs."""
    rows = []
    for mine, theirs, alike in RATIOS:
        pairs = [
            a["steady"] / b["steady"]
            for a, b in zip(res.get(mine, []), res.get(theirs, []))
            if "error" not in a and "error" not in b
        ]
        if pairs:
            rows.append([f"{mine} / {theirs}", alike, median(pairs), ", ".join(f"{x:.2f}" for x in pairs)])
    return rows


def vllm_missing(dry: bool) -> str | None:
    if dry:
        return "--dry-cpu runs no vLLM engine"
    return None if importlib.util.find_spec("vllm") else "vLLM is not importable"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="pair,qwen05")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--steps", type=int, default=8, help="iterations per case (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="pairs per configuration: every variant once per pair")
    ap.add_argument("--k", type=int, default=4, help="questions (reward functions) per rollout")
    ap.add_argument(
        "--budget",
        type=float,
        help="seconds per case (default: the configuration's own): a case starts no iteration after its process "
        "has run this long, once it has 3; it is killed at 1.5 x budget + 60 s",
    )
    ap.add_argument("--models", help="where to build the models (default: a temporary directory)")
    ap.add_argument("--dry-cpu", action="store_true", help="tiny shapes on the CPU, 1 pair: a smoke test")
    a = ap.parse_args()
    device, dtype, job = ("cpu", "bfloat16", DRY_JOB) if a.dry_cpu else ("cuda", "bfloat16", JOB)
    if a.dry_cpu:  # 4 iterations with a 1-s budget: every case stops after 3, through the budget's own path
        a.steps, a.repeats, a.budget = 4, 1, 1.0
    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"benchmarks.gpu: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    missing, no_vllm = trl_missing(), vllm_missing(a.dry_cpu)
    if missing and not a.dry_cpu:
        sys.exit(
            f"benchmarks.gpu: the TRL side cannot run: {missing}. Install the bench extra, or add --dry-cpu "
            "for a smoke run that skips TRL."
        )
    if not a.dry_cpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks.gpu: no CUDA device is visible; run on a GPU host, or add --dry-cpu")
    skipped = [
        v for v in variants if (VARIANTS[v].get("vllm") and no_vllm) or (VARIANTS[v]["impl"] == "trl" and missing)
    ]
    variants = [v for v in variants if v not in skipped]

    j = job
    print(
        f"rlme vs TRL GRPOTrainer (cispo, beta 0, bf16 compute, fp32 master weights, full fine-tune): {j['prompts']} prompts "
        f"x G={j['group_size']}, {j['max_new_tokens']} new tokens, K={a.k}, micro-batch {j['micro']} x {j['accum']} (one "
        f"optimizer step per iteration), {a.steps} iterations per case, {a.repeats} pair(s) of every variant, fresh "
        "subprocess per case, variants alternating (reversed in odd pairs); both sides keep their last 2 checkpoints"
    )
    if a.dry_cpu:
        print(f"device: CPU (--dry-cpu); {machine()}")
    else:
        import torch

        print(f"device: {torch.cuda.get_device_name()} (GPU host); {machine()}")
    print("variants:")
    for v in variants:
        print(f"  {v}: {VARIANTS[v]['what']}")
    for v in skipped:
        print(f"  {v}: skipped ({no_vllm if VARIANTS[v].get('vllm') else missing})")
    sys.stdout.flush()

    failed = 0
    with tempfile.TemporaryDirectory(prefix="rlme-bench-gpu-") as tmp:
        root = Path(a.models) if a.models else Path(tmp) / "models"
        for name in a.configs.split(","):
            models = build_models(root, name, a.dry_cpu)
            size = {k: n_params(v) for k, v in models.items()}
            budget = a.budget or CONFIGS[name]["budget"]
            res: dict[str, list] = {v: [] for v in variants}
            for r in range(a.repeats):
                for v in variants if r % 2 == 0 else variants[::-1]:
                    spec = {k: x for k, x in VARIANTS[v].items() if k != "what"}
                    storage = os.path.join(tmp, f"{name}-{v}-{r}")
                    c = {"k": a.k, "steps": a.steps, "device": device, "dtype": dtype, "job": job}
                    c.update(spec, **models, storage=storage, budget=budget)
                    env = {"CUDA_VISIBLE_DEVICES": ""} if a.dry_cpu else {}
                    kill = 900 if a.dry_cpu else 1.5 * budget + 60  # a dry case's start-up alone can take a minute
                    try:
                        out = run_case("benchmarks.vs_trl", c, env=env, timeout=kill)
                    except subprocess.TimeoutExpired:
                        out = {"error": f"killed after {kill:.0f}s"}
                    except RuntimeError as e:  # the case's output goes to stderr; the run goes on
                        print(e, file=sys.stderr, flush=True)
                        out = {"error": "failed (stderr)"}
                    shutil.rmtree(storage, ignore_errors=True)  # checkpoints of GBs: one case's at a time
                    if out.get("prefect_imported") or out.get("s3fs_imported"):
                        sys.exit(f"benchmarks.gpu: the {v} case imported prefect or s3fs; it must need neither")
                    failed += "error" in out
                    res[v].append(out)
                    print(
                        f"# {name}, pair {r + 1} of {a.repeats}, {v}: "
                        + (out.get("error") or f"steady {out['steady']:.3g} s/iter over {out['steps']} iterations"),
                        file=sys.stderr,
                        flush=True,
                    )
                done = ratio_rows({v: res[v][r:] for v in variants})  # this pair's ratios, in case the run is cut off
                print(
                    f"# {name}, pair {r + 1}: " + ", ".join(f"{x[0]} {x[2]:.2f}" for x in done),
                    file=sys.stderr,
                    flush=True,
                )
            # each configuration's tables as soon as it is measured: a run cut off later still shows them
            print(
                f"\n{name}: policy {size['policy']:.1f}M, evaluator {size['evaluator']:.1f}M parameters; "
                f"a case's budget {budget:.0f} s"
            )
            mem = "peak RSS GiB" if a.dry_cpu else "peak GPU GiB"
            heads = ["variant", "cases", "iterations", "steady s/iter", "generate s", "score s", "update s"]
            heads += ["checkpoint write s", "commit waited s", "gen tokens/s", mem, "reward", "process s/iter"]
            print(table(heads, [row(v, res[v], a.steps, a.dry_cpu) for v in variants]))
            print(f"\n{name}: rlme/TRL, like for like (steady s/iter; below 1 rlme is faster)")
            print(table(["rlme / TRL", "alike", "ratio (median)", "per pair"], ratio_rows(res)), flush=True)
    print(
        "\ncheckpoint write s: rlme's checkpoint write per iteration (median), in the update stage; with bg it runs "
        "beside the next iteration's sampling, and the commit waits only for what is left (commit waited s); "
        "generate s with bg is that sampling. TRL's update s is its step time less generation and rewards, its "
        "save included."
    )
    if failed:
        sys.exit(f"benchmarks.gpu: {failed} case(s) failed or were killed (above)")


if __name__ == "__main__":
    main()
