"""In-process vllm.LLM probe: sampling + exact answer-token log-probs, vs transformers.

Run with the vLLM venv's interpreter (it also has transformers):
    export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1
    /tmp/vllm-venv/bin/python dev/vllm_probe_llm.py /tmp/tinyllm [raw_logprobs|processed_logprobs]

vLLM spawns/forks worker processes, so everything that builds vllm.LLM must sit under the
`if __name__ == "__main__":` guard.
"""

import sys
import time


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tinyllm"
    mode = sys.argv[2] if len(sys.argv) > 2 else "raw_logprobs"

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def hf_lp(ids: list[int], temperature: float = 1.0) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        return torch.log_softmax(logits / temperature, -1)

    t0 = time.time()
    llm = LLM(
        model=model_dir,
        dtype="float32",
        enable_prefix_caching=True,
        enforce_eager=True,  # skip torch.compile: engine init ~1 s instead of ~10-30 s
        block_size=32,  # CPU default is 128: prefix-cache hits only in whole blocks
        logprobs_mode=mode,
        seed=0,
    )
    print(f"LLM(...) ready in {time.time() - t0:.1f}s; logprobs_mode={mode}")

    prompt = [tok.bos_token_id] + tok.encode("Question: Is the answer correct? Answer:")
    yes, no = tok.encode(" Yes")[0], tok.encode(" No")[0]

    # ---- sampling ----
    T = 0.7
    sp = SamplingParams(n=4, seed=1234, temperature=T, top_p=0.9, max_tokens=8, logprobs=0, ignore_eos=True)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
    print(f"generate n=4 x 8: {time.time() - t0:.3f}s")
    ro = outs[0]
    print("RequestOutput fields: prompt_token_ids", ro.prompt_token_ids[:4], "...; outputs:", len(ro.outputs))
    c = ro.outputs[0]
    print(
        "CompletionOutput: token_ids",
        list(c.token_ids),
        "cumulative_logprob",
        c.cumulative_logprob,
        "finish_reason",
        c.finish_reason,
    )
    print("CompletionOutput.logprobs[0] (dict[int, Logprob]):", c.logprobs[0])

    def top_p_renorm(lp: torch.Tensor, p: float) -> torch.Tensor:
        srt, idx = lp.sort(descending=True)
        keep = (srt.exp().cumsum(0) - srt.exp()) < p  # smallest set with mass >= p
        out = torch.full_like(lp, float("-inf"))
        out[idx[keep]] = lp[idx[keep]] - torch.logsumexp(lp[idx[keep]], 0)
        return out

    d_raw = d_proc = d_topp = 0.0
    for i, t in enumerate(c.token_ids):
        lp = c.logprobs[i][t].logprob
        ctx = prompt + list(c.token_ids[:i])
        d_raw = max(d_raw, abs(hf_lp(ctx)[t].item() - lp))
        d_proc = max(d_proc, abs(hf_lp(ctx, T)[t].item() - lp))
        d_topp = max(d_topp, abs(top_p_renorm(hf_lp(ctx, T), 0.9)[t].item() - lp))
    print(
        f"sampled-token logprob vs HF raw: {d_raw:.3g}; vs HF logits/T: {d_proc:.3g}; "
        f"vs logits/T renormalised over the top-p=0.9 nucleus: {d_topp:.3g}"
    )
    again = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
    print(
        "seeded resample identical:",
        [list(o.token_ids) for o in ro.outputs] == [list(o.token_ids) for o in again[0].outputs],
        "| n samples distinct:",
        len({tuple(o.token_ids) for o in ro.outputs}),
    )

    # ---- scoring: logprob_token_ids on the first generated position ----
    ref = hf_lp(prompt)
    sc = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[yes, no])
    t0 = time.time()
    o = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sc, use_tqdm=False)[0]
    d = o.outputs[0].logprobs[0]
    print(f"logprob_token_ids: {d}  ({time.time() - t0:.3f}s)")
    print(f"|d| vs HF: Yes={abs(d[yes].logprob - ref[yes].item()):.3g} No={abs(d[no].logprob - ref[no].item()):.3g}")

    # ---- scoring: prompt_logprobs with the answer appended ----
    sp2 = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    o2 = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt + [yes]), TokensPrompt(prompt_token_ids=prompt + [no])],
        sp2,
        use_tqdm=False,
    )
    print("prompt_logprobs[-1]:", o2[0].prompt_logprobs[-1], "| [0]:", o2[0].prompt_logprobs[0])
    print(
        f"|d| vs HF: Yes={abs(o2[0].prompt_logprobs[-1][yes].logprob - ref[yes].item()):.3g} "
        f"No={abs(o2[1].prompt_logprobs[-1][no].logprob - ref[no].item()):.3g}"
    )

    # ---- prefix cache: K suffixes after one long shared prefix, one batch ----
    prefix = (prompt * 30)[:256]
    K = 8
    batch = [TokensPrompt(prompt_token_ids=prefix + [100 + k]) for k in range(K)]
    t0 = time.time()
    res = llm.generate(batch, sc, use_tqdm=False)
    print(
        f"{K} scorings after a 256-token shared prefix in one generate(): {time.time() - t0:.3f}s; num_cached_tokens:",
        [r.num_cached_tokens for r in res],
    )
    worst = max(
        abs(r.outputs[0].logprobs[0][yes].logprob - hf_lp(prefix + [100 + k])[yes].item()) for k, r in enumerate(res)
    )
    print(f"max |d| Yes vs HF over the {K} (with cache hits): {worst:.3g}")


if __name__ == "__main__":
    main()
