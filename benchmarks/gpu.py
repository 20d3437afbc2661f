"""rlme versus TRL's GRPOTrainer at GPU sizes: one card, bf16, full fine-tuning, the same job, alternating.

    make bench-gpu                                   # or: PYTHONPATH=. python -m benchmarks.gpu
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
Each case runs in a fresh subprocess; per configuration rlme and TRL alternate. Reported: steady s/iteration
(median interval between iterations 2..N), the stage breakdown (medians over the same iterations; TRL's
update is its step time minus generation and rewards), generated tokens/s during generation, the peak GPU
memory allocated by torch (peak RSS with --dry-cpu), and the card.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
CONFIGS = {
    "pair": dict(policy=POLICY_LLAMA, evaluator=EVALUATOR_QWEN2, vocab=None),
    "qwen05": dict(policy=POLICY_QWEN05, evaluator=EVALUATOR_QWEN2, vocab=QWEN_VOCAB),
}
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


def row(name: str, impl: str, rs: list[dict], dry: bool) -> list:
    if not rs:
        return [name, impl] + [None] * 9
    if "error" in rs[0]:
        return [name, impl, rs[0]["error"]] + [None] * 8
    st = [steady_stages(r) for r in rs]
    steady = median([r["steady"] for r in rs])
    gen, score = median([s["generate"] for s in st]), median([s["score"] for s in st])
    if impl == "rlme":
        update = median([s["update"] + s.get("aggregate", 0.0) for s in st])
        ckpt = median([s["checkpoint"] for s in st])
    else:
        update, ckpt = steady - gen - score, None
    tok_s = median([s["tokens"] / s["generate"] for s in st if s["generate"]])
    mem = median([r["gpu_peak_mib"] / 1024 for r in rs]) if not dry else median([r["peak_mib"] / 1024 for r in rs])
    return [
        name,
        impl,
        steady,
        gen,
        score,
        update,
        ckpt,
        tok_s,
        mem,
        median([r["reward_mean"] for r in rs]),
        median([r["per_iter"] for r in rs]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="pair,qwen05")
    ap.add_argument("--steps", type=int, default=4, help="iterations per case (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=1, help="rlme/TRL pairs per configuration")
    ap.add_argument("--k", type=int, default=4, help="questions (reward functions) per rollout")
    ap.add_argument("--case-timeout", type=float, default=240, help="seconds before a case is reported as timed out")
    ap.add_argument("--models", help="where to build the models (default: a temporary directory)")
    ap.add_argument("--dry-cpu", action="store_true", help="tiny shapes on the CPU, 2 iterations: a smoke test")
    a = ap.parse_args()
    device, dtype, job = ("cpu", "bfloat16", DRY_JOB) if a.dry_cpu else ("cuda", "bfloat16", JOB)
    if a.dry_cpu:
        a.steps, a.repeats = 2, 1
    missing = trl_missing()
    if missing and not a.dry_cpu:
        sys.exit(
            f"benchmarks.gpu: the TRL side cannot run: {missing}. Install the bench extra, or add --dry-cpu "
            "for a smoke run that skips TRL."
        )
    if not a.dry_cpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks.gpu: no CUDA device is visible; run on a GPU machine, or add --dry-cpu")

    results, sizes = [], {}
    with tempfile.TemporaryDirectory(prefix="rlme-bench-gpu-") as tmp:
        root = Path(a.models) if a.models else Path(tmp) / "models"
        for name in a.configs.split(","):
            models = build_models(root, name, a.dry_cpu)
            sizes[name] = {k: n_params(v) for k, v in models.items()}
            res: dict[str, list] = {"rlme": [], "trl": []}
            for r in range(a.repeats):
                for impl in ("rlme", "trl") if r % 2 == 0 else ("trl", "rlme"):
                    if impl == "trl" and missing:
                        continue
                    c = {
                        "impl": impl,
                        "k": a.k,
                        "steps": a.steps,
                        "device": device,
                        "dtype": dtype,
                        "job": job,
                        **models,
                        "storage": os.path.join(tmp, f"{name}-{impl}-{r}"),
                    }
                    env = {"CUDA_VISIBLE_DEVICES": ""} if a.dry_cpu else {}
                    try:
                        out = run_case("benchmarks.vs_trl", c, env=env, timeout=a.case_timeout)
                    except subprocess.TimeoutExpired:
                        out = {"error": f"timed out after {a.case_timeout:.0f}s"}
                    if out.get("prefect_imported") or out.get("s3fs_imported"):
                        sys.exit(f"benchmarks.gpu: the {impl} case imported prefect or s3fs; it must need neither")
                    res[impl].append(out)
                    # one line per finished case, so a run cut off by its time limit still says what it measured
                    print(
                        f"# {name} {impl}: "
                        + (out.get("error") or f"steady {out.get('steady', float('nan')):.3g} s/iter"),
                        file=sys.stderr,
                        flush=True,
                    )
            results.append((name, res))

    j = job
    print(
        f"rlme vs TRL GRPOTrainer (cispo, beta 0, bf16 compute, fp32 master weights, full fine-tune): {j['prompts']} prompts "
        f"x G={j['group_size']}, {j['max_new_tokens']} new tokens, K={a.k}, micro-batch {j['micro']} x {j['accum']} (one "
        f"optimizer step per iteration), {a.steps} iterations per case, {a.repeats} pair(s), fresh subprocess per case"
    )
    card = next((x.get("card") for _, res in results for rs in res.values() for x in rs if x.get("card")), None)
    print(f"device: {card or 'CPU (--dry-cpu)'}; {machine()}")
    for name in sizes:
        print(f"  {name}: policy {sizes[name]['policy']:.1f}M, evaluator {sizes[name]['evaluator']:.1f}M parameters")
    if missing:
        print(f"TRL side skipped: {missing}")
    rows = []
    for name, res in results:
        rows += [row(name, impl, res[impl], a.dry_cpu) for impl in ("rlme", "trl") if res[impl] or impl == "rlme"]
        r, t = res["rlme"], res["trl"]
        if r and t and "error" not in r[0] and "error" not in t[0]:
            rows.append(
                [name, "rlme/TRL", median([x["steady"] for x in r]) / median([x["steady"] for x in t])] + [None] * 8
            )
    mem = "peak RSS GiB" if a.dry_cpu else "peak GPU GiB"
    print(
        table(
            [
                "config",
                "impl",
                "steady s/iter",
                "generate s",
                "score s",
                "update s",
                "of which checkpoint s",
                "gen tokens/s",
                mem,
                "reward",
                "process s/iter",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
