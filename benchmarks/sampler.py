"""The hf sampler against the sampler it replaced and against `model.generate()`, side by side.

    PYTHONPATH=. python -m benchmarks.sampler --device cuda          # Qwen2.5-0.5B shape, bf16, 64 x (128 + 256)
    PYTHONPATH=. python -m benchmarks.sampler --tiny                 # smoke sizes on the CPU (the test suite runs it)
    PYTHONPATH=. python -m benchmarks.sampler --model gguf:.cache/real-models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 16 --prompt 64 --new 48 --methods rlme,generate     # a real pretrained model (any rlme model reference)

Three ways to draw the same job (the same random-weight model, prompts, temperature and top-p):
  rlme      rlme_pipeline.backends.hf.sample: one counter-based uniform per (seed, step) on the device,
            inverse-CDF draw, ids and log-probs copied to the host once
  old       the sampler before issue 14, kept here as the baseline only: the batch x vocabulary logits
            copied to the host at every token, Gumbel noise from one CPU torch.Generator per row
  generate  transformers' model.generate(do_sample=True), top_k off; no per-sample seeds (so no exact resume)
The model is built offline from a Qwen2Config (default: Qwen2.5-0.5B's shape with its 151,936-token
vocabulary; no download), or, with --model, loaded from any rlme model reference (an HF directory, gguf:PATH). Prompts are random ids, all of one length; the stop token is the last id, which a
random model rarely draws, so every method runs (nearly) the whole budget. Methods alternate in each
repeat after one short warm-up each; times are medians. Before timing, it checks that the uniforms drawn on
the device equal the CPU's bit for bit, and how many rows sample the same tokens in a smaller batch.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import machine, median, spread, table

QWEN_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
}
TINY = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}


def build(shape: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=shape["vocab_size"] - 1,
        bos_token_id=1,
    )
    with torch.device(device):
        return Qwen2ForCausalLM(cfg).to(dtype).eval()


@torch.no_grad()
def old_sample(model, prompts, seeds, *, max_new_tokens, temperature, top_p, eos_ids, pad_id):
    """The hf sampler as it was before issue 14 (a measurement baseline only)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(s) for s in prompts)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in prompts], device=device)

    def positions(m):
        return (m.cumsum(-1) - 1).clamp(min=0)

    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(mask),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    pos = positions(mask)[:, -1:]
    B = len(prompts)
    tokens, done = [[] for _ in range(B)], [False] * B
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1, :].float() / temperature, dim=-1)
        filtered = logp
        if top_p < 1.0:
            sorted_logp, order = logp.sort(dim=-1, descending=True)
            cum = sorted_logp.exp().cumsum(-1)
            drop = torch.zeros_like(cum, dtype=torch.bool).scatter(-1, order, (cum - sorted_logp.exp()) >= top_p)
            filtered = logp.masked_fill(drop, float("-inf"))
        filtered = filtered.cpu()
        noise = torch.stack([torch.rand(filtered.shape[-1], generator=g) for g in gens])
        nxt = (filtered - torch.log(-torch.log(noise.clamp_min(1e-20)))).argmax(-1)
        chosen = logp.cpu().gather(-1, nxt[:, None])[:, 0]
        for r in range(B):
            if not done[r]:
                tokens[r].append((int(nxt[r]), float(chosen[r])))
                done[r] = int(nxt[r]) in eos_ids
        if all(done):
            break
        step = torch.where(torch.tensor(done), torch.tensor(pad_id), nxt)[:, None].to(device)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos + 1
        out = model(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    return [len(t) for t in tokens]


def rlme_sample(model, prompts, seeds, *, eos_check_every=None, **kw):
    from rlme_pipeline.backends.hf import sample

    return [len(s.token_ids) for s in sample(model, prompts, seeds, eos_check_every=eos_check_every, **kw)]


@torch.no_grad()
def generate(model, prompts, seeds, *, max_new_tokens, temperature, top_p, eos_ids, pad_id):
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)  # all of one length: no padding
    (eos,) = eos_ids
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad_id,
    )
    new = out[:, ids.shape[1] :].tolist()
    return [next((i + 1 for i, t in enumerate(row) if t == eos), len(row)) for row in new]


METHODS = {"rlme": rlme_sample, "old": old_sample, "generate": generate}


def load(ref: str, device: str, dtype: torch.dtype):
    """A real model by rlme's references (gguf:PATH is imported once, as training does)."""
    from transformers import AutoModelForCausalLM

    from rlme_pipeline.models.loading import resolve_ref

    return AutoModelForCausalLM.from_pretrained(resolve_ref(ref), dtype=dtype).to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(name, model, prompts, seeds, device, **kw) -> dict:
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lengths = METHODS[name](model, prompts, seeds, **kw)
    _sync(device)
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"seconds": secs, "tokens": sum(lengths), "peak_gib": peak}


def checks(model, prompts, seeds, device, kw) -> list[str]:
    """Uniforms equal across devices; rows sampled in a batch of 8 against the whole batch."""
    from rlme_pipeline.algorithm.sampling import uniforms
    from rlme_pipeline.backends.hf import sample

    s = torch.tensor(seeds, dtype=torch.int64)
    same_u = torch.equal(uniforms(s.to(device), 64).cpu(), uniforms(s, 64))
    if not same_u:
        raise SystemExit(f"uniforms on {device} differ from the CPU's: exact resume across devices is broken")
    k = min(8, max(1, len(prompts) // 2))
    short = dict(kw, max_new_tokens=min(32, kw["max_new_tokens"]))
    few = sample(model, prompts[:k], seeds[:k], **short)
    every = sample(model, prompts, seeds, **short)[:k]
    same = sum(a.token_ids == b.token_ids for a, b in zip(few, every))
    return [
        f"uniforms on {device} equal the CPU's bit for bit: {same_u}",
        (
            f"rows with identical tokens in a batch of {k} and of {len(prompts)} ({short['max_new_tokens']} tokens): "
            f"{same}/{k} (the model's own forward pass need not be batch-invariant in low precision on a GPU)"
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: a 2-layer, 2,048-token model, 4 x (16 + 16)")
    ap.add_argument(
        "--model",
        default=None,
        help="a real model instead of the random Qwen2 (HF directory, gguf:PATH, hub id): its own vocabulary; the "
        "prompts stay random ids and the stop id the last id, which it rarely draws, so every method runs the budget",
    )
    for k, v in QWEN_05B.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-repeats", type=int, default=1, help="the old sampler is slow at full size: fewer runs")
    ap.add_argument("--methods", default="rlme,generate,old")
    ap.add_argument(
        "--eos-check-every",
        type=int,
        default=None,
        help="rlme's host sync interval (default: 1 on the CPU, 8 on a GPU); set 8 on the CPU to dry-run the GPU path",
    )
    a = ap.parse_args()
    shape = {k: getattr(a, k) for k in QWEN_05B}
    if a.tiny:
        shape, a.batch, a.prompt, a.new, a.repeats = dict(TINY), 4, 16, 16, 1
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    model = load(a.model, a.device, dtype) if a.model else build(shape, a.device, dtype)
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    prompts = torch.randint(2, V - 1, (a.batch, a.prompt), generator=g).tolist()
    seeds = [1000 + i for i in range(a.batch)]
    kw = {"max_new_tokens": a.new, "temperature": a.temperature, "top_p": a.top_p, "eos_ids": {V - 1}, "pad_id": 0}
    notes = checks(model, prompts, seeds, a.device, kw)
    methods = a.methods.split(",")
    extra = {"rlme": {"eos_check_every": a.eos_check_every}}
    for m in methods:  # warm-up: kernels, allocator, cuBLAS handles
        timed(m, model, prompts, seeds, a.device, **dict(kw, max_new_tokens=min(8, a.new)), **extra.get(m, {}))
    res: dict[str, list[dict]] = {m: [] for m in methods}
    for i in range(a.repeats):
        for m in methods[i % len(methods) :] + methods[: i % len(methods)]:
            if m == "old" and i >= a.old_repeats:
                continue
            res[m].append(timed(m, model, prompts, seeds, a.device, **kw, **extra.get(m, {})))
    base = median([r["seconds"] for r in res["generate"]]) if res.get("generate") else None
    rows = []
    for m in methods:
        secs = [r["seconds"] for r in res[m]]
        t, tok = median(secs), median([r["tokens"] for r in res[m]])
        peak = res[m][0]["peak_gib"]
        rows.append([m, len(secs), t, spread(secs), tok, tok / t, t / base if base else None, peak])
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    c = model.config
    what = f"{a.model} ({c.model_type})" if a.model else "Qwen2 random weights"
    print(
        f"sampling {a.batch} prompts x {a.prompt} tokens, {a.new} new tokens, T={a.temperature}, top_p={a.top_p}; "
        f"{what} {n_params:.3g}M params, vocab {V}, hidden {c.hidden_size}, "
        f"{c.num_hidden_layers} layers, {dtype}; device {a.device}"
    )
    gpu = f"{torch.cuda.get_device_name()}; " if a.device.startswith("cuda") else ""
    print(f"machine: {gpu}{machine()}")
    for n in notes:
        print(n)
    print(table(["method", "runs", "seconds", "spread", "tokens", "tokens/s", "x generate()", "peak GiB"], rows))
    if "old" in res and "rlme" in res:
        print(
            f"old / rlme: {median([r['seconds'] for r in res['old']]) / median([r['seconds'] for r in res['rlme']]):.2f}x"
        )


if __name__ == "__main__":
    main()
