"""Peak memory and time of the update's log-prob computation versus the naive full-vocabulary log_softmax.

    PYTHONPATH=. python -m benchmarks.logprobs [--vocabs 32000,150000] [--batch 8] [--prompt 64] [--completion 256] [--tiny]

One micro-batch, forward and backward, on a Llama with the tiny demo's shape (hidden 256, 2 layers) and a
vocabulary of V. "rlme" is `rlme_pipeline.algorithm.logprobs.completion_logprobs` (only completion positions go through
the LM head, in chunks of `--chunk-tokens`, each recomputed in the backward pass); "naive" is
`model(ids).logits.log_softmax(-1).gather(...)` over every position. Each case runs in a fresh subprocess; its
peak is VmHWM after resetting the high-water mark (/proc/self/clear_refs) once the model and inputs exist,
minus the RSS at that moment: the memory the computation itself adds (activations, logits, gradients).
Cases alternate rlme/naive; numbers are medians of the repeats.
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import emit, machine, median, run_case, spread, table, vm_kib


def case(c: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlme_pipeline.algorithm.logprobs import completion_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c["vocab"],
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            pad_token_id=0,
        )
    )
    g = torch.Generator().manual_seed(1)
    pairs = [
        (
            torch.randint(1, c["vocab"], (c["prompt"],), generator=g).tolist(),
            torch.randint(1, c["vocab"], (c["completion"],), generator=g).tolist(),
        )
        for _ in range(c["batch"])
    ]
    for p in model.parameters():  # gradients exist in both variants: allocate them before the baseline
        p.grad = torch.zeros_like(p)

    def naive():
        ids = torch.tensor([p + q for p, q in pairs])
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        P = c["prompt"]
        tgt = ids[:, P:]
        return logp[:, P - 1 : -1].gather(-1, tgt[..., None])[..., 0].reshape(-1)

    def ours():
        return completion_logprobs(model, pairs, pad_id=0, chunk_tokens=c["chunk"])

    fn = ours if c["method"] == "rlme" else naive
    fn().sum().backward()  # warm-up (allocator, kernels); its peak is then reset
    model.zero_grad(set_to_none=False)
    import gc

    gc.collect()
    base = vm_kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    fn().sum().backward()
    secs = time.perf_counter() - t0
    return {"peak_mib": (vm_kib("VmHWM") - base) / 1024, "seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case")
    ap.add_argument("--vocabs", default="32000,150000")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--chunk-tokens", type=int, default=256, help="the config default (optimizer.logprob_chunk_tokens)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: vocab 2000, 2 x (8 + 16) tokens, one repeat")
    a = ap.parse_args()
    if a.case:
        import json

        emit(case(json.loads(a.case)))
        return
    if a.tiny:
        a.vocabs, a.batch, a.prompt, a.completion, a.chunk_tokens, a.repeats = "2000", 2, 8, 16, 16, 1
    res: dict[tuple, list[dict]] = {}
    for _ in range(a.repeats):
        for v in [int(x) for x in a.vocabs.split(",")]:
            for m in ("rlme", "naive"):
                r = run_case(
                    "benchmarks.logprobs",
                    {
                        "vocab": v,
                        "method": m,
                        "batch": a.batch,
                        "prompt": a.prompt,
                        "completion": a.completion,
                        "chunk": a.chunk_tokens,
                    },
                )
                res.setdefault((v, m), []).append(r)
    rows = []
    for v in [int(x) for x in a.vocabs.split(",")]:
        ours, nv = res[(v, "rlme")], res[(v, "naive")]
        pm_o, pm_n = median([r["peak_mib"] for r in ours]), median([r["peak_mib"] for r in nv])
        t_o, t_n = median([r["seconds"] for r in ours]), median([r["seconds"] for r in nv])
        rows.append([v, pm_o, pm_n, pm_o / pm_n, t_o, t_n, t_o / t_n, spread([r["seconds"] for r in ours + nv])])
    print(
        f"update log-probs, forward+backward of one micro-batch: {a.batch} x ({a.prompt} prompt + {a.completion} completion) "
        f"tokens, Llama hidden 256 / 2 layers, chunk {a.chunk_tokens} tokens; fresh subprocess per case, median of {a.repeats}"
    )
    print(f"machine: {machine()}")
    print(
        table(
            [
                "vocab",
                "peak MiB rlme",
                "peak MiB naive",
                "peak ratio rlme/naive",
                "s rlme",
                "s naive",
                "time ratio",
                "time spread",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
