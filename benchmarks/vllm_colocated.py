"""The colocated vLLM engine's two costs, measured on one in-process engine (run it with the vLLM venv):

    PYTHONPATH=. .venv-vllm/bin/python -m benchmarks.vllm_colocated MODEL_DIR [--prompts 16 --samples 4 ...]

1. Per-request seeds. The vllm backend sends one SamplingParams per sample with its own `seed` (a sample
   depends on its seed only: a resumed stage redraws the same completions). vLLM then gives each such
   request its own torch.Generator and draws its noise row by row (vllm/v1/sample/ops/topk_topp_sampler.py:
   on CPU one randint per seeded request and step; on CUDA one exponential_ kernel per seeded request and
   step; FlashInfer's sampler is out either way with processed_logprobs). Against it: the same requests
   with no per-request seed, one batch drawn from the engine's generator (seeded once, at construction).
   Same prompts, same engine, cases alternating A B A B; medians of --repeats, in wall seconds and in
   this process's CPU seconds (the engine runs in this process, so a busy neighbour inflates wall time
   but not CPU time). Then vLLM's sampler alone (TopKTopPSampler, this platform's path,
   processed_logprobs) on one step's logits of all the requests, with and without a generator per row.
2. Weights into a running engine: the trainer's tensors pushed (`push_weights`, no file) against the same
   weights reloaded from a saved checkpoint directory (`reload_weights`, the page cache warm), and against
   a new engine (what a restart per stage costs). The pushed and reloaded engines' prompt log-probs are
   compared (they must be equal: the test is tests/backends/test_colocated.py).

Prints a markdown table and one JSON line. Numbers in docs/vllm.md ("Colocated").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per completion (ignore_eos)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from rlme_pipeline.backends.vllm import load_llm, push_weights, reload_weights

    t0 = time.perf_counter()
    llm = load_llm(args.model, "float32", colocate=True, enforce_eager=True, block_size=32)
    first_engine = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab - 10, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.prompts)]
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(args.samples)]
    common = dict(temperature=1.0, max_tokens=args.tokens, logprobs=0, ignore_eos=True)

    def timed(params) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - t, time.process_time() - c

    llm.generate(requests[:2], SamplingParams(n=1, **common), use_tqdm=False)  # warm-up
    times = {"seeded": [], "one_batch": []}
    for _ in range(args.repeats):
        times["seeded"].append(timed([SamplingParams(n=1, seed=1000 + i, **common) for i in range(len(requests))]))
        times["one_batch"].append(timed(SamplingParams(n=1, **common)))

    sampler, logits = TopKTopPSampler("processed_logprobs"), torch.randn(len(requests), vocab)
    cases = {"seeded": {i: torch.Generator().manual_seed(i) for i in range(len(requests))}, "one_batch": {}}
    per_step = {name: [] for name in cases}
    for _ in range(200):  # alternating, CPU seconds of this process
        for name, gens in cases.items():
            x = logits.clone()
            c = time.process_time()
            sampler(x, gens, None, None)
            per_step[name].append(time.process_time() - c)
    per_step = {name: statistics.median(v) for name, v in per_step.items()}

    # 2. the trainer's weights: pushed, or reloaded from their checkpoint
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    saved = tempfile.mkdtemp(prefix="rlme-colocated-")
    hf.save_pretrained(saved)
    probe = [TokensPrompt(prompt_token_ids=prompts[0])]

    def prompt_logprobs() -> list[float]:
        out = llm.generate(probe, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompts[0][1:])]

    push, reload = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        push_weights(llm, hf.state_dict().items())
        push.append(time.perf_counter() - t)
        pushed = prompt_logprobs()
        t = time.perf_counter()
        reload_weights(llm, saved)
        reload.append(time.perf_counter() - t)
        reloaded = prompt_logprobs()
    delta = max(abs(a - b) for a, b in zip(pushed, reloaded))

    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    rows = [
        ("generate, per-request seeds (one SamplingParams per sample)", wall["seeded"], cpu["seeded"]),
        ("generate, one batch, engine-seeded (no per-request seed)", wall["one_batch"], cpu["one_batch"]),
        ("sampler step, a generator per request (CPU s)", per_step["seeded"], None),
        ("sampler step, no per-request generator (CPU s)", per_step["one_batch"], None),
        ("push the trainer's tensors (push_weights)", statistics.median(push), None),
        ("reload the saved checkpoint (reload_weights)", statistics.median(reload), None),
        ("a new in-process engine (vllm imported already)", first_engine, None),
    ]
    print(f"{len(requests)} requests x {args.tokens} tokens ({args.prompts} x {args.samples}), {args.repeats} repeats")
    print("| what | wall s (median) | CPU s (median) |\n| --- | --- | --- |")
    for name, sec, c in rows:
        print(f"| {name} | {sec:.5f} | {'' if c is None else f'{c:.3f}'} |")
    ratio_wall, ratio_cpu = wall["seeded"] / wall["one_batch"], cpu["seeded"] / cpu["one_batch"]
    extra_ms = 1e3 * (per_step["seeded"] - per_step["one_batch"])
    print(
        f"seeded / one batch: wall {ratio_wall:.3f}, CPU {ratio_cpu:.3f}; sampler +{extra_ms:.3f} ms a step; "
        f"pushed vs reloaded prompt log-probs max |d| {delta:.1e}"
    )
    result = {"times": times, "sampler": per_step, "push": push, "reload": reload, "first_engine": first_engine}
    print(json.dumps({**result, "delta": delta}))


if __name__ == "__main__":
    main()
