"""Probe a running vLLM OpenAI-compatible server (/v1/completions) against transformers.

Usage (any venv with torch + transformers; the HTTP side is stdlib urllib only):
    python dev/vllm_probe_server.py --url http://127.0.0.1:8765 --model-dir /tmp/tinyllm

Checks: (a) sampling n completions from token-id prompts, with seed/temperature/top_p, returning
token ids + per-token logprobs, and whether those logprobs are raw or temperature-processed;
(b) exact next-token log-probs of chosen answer tokens, three ways, vs a float32 HF forward;
(c) prefix-cache hit counters from /metrics.
"""

import argparse
import json
import math
import time
import urllib.request

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def metrics(url: str) -> dict[str, float]:
    out = {}
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:prefix_cache_") and not line.startswith("#"):
                name, val = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(val)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--model-dir", default="/tmp/tinyllm")
    a = ap.parse_args()
    url = a.url.rstrip("/")
    comp = url + "/v1/completions"

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()

    def hf_logprobs(ids: list[int], temperature: float = 1.0) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        return torch.log_softmax(logits / temperature, -1)

    prompt = [tok.bos_token_id] + tok.encode("Question: Is the answer correct? Answer:")
    yes, no = tok.encode(" Yes"), tok.encode(" No")
    assert len(yes) == len(no) == 1, (yes, no)
    yes, no = yes[0], no[0]
    print("prompt ids", prompt, "yes", yes, "no", no)

    # ---- (a) sampling -------------------------------------------------------------------
    T, P = 0.7, 0.9
    body = {
        "prompt": prompt,  # list[int] = one token-id prompt; list[list[int]] = a batch
        "n": 4,
        "seed": 1234,
        "temperature": T,
        "top_p": P,
        "max_tokens": 8,
        "logprobs": 0,  # 0 = only the sampled token's logprob
        "return_token_ids": True,  # choice.token_ids / choice.prompt_token_ids
        "return_tokens_as_token_ids": True,  # logprobs.tokens as "token_id:N"
        "ignore_eos": True,
        "skip_special_tokens": False,
    }
    t0 = time.time()
    r1 = post(comp, body)
    dt = time.time() - t0
    r2 = post(comp, body)
    samples = [c["token_ids"] for c in r1["choices"]]
    print(f"(a) n=4 x 8 tokens in {dt:.3f}s; samples:", samples)
    print("(a) same seed -> same samples:", samples == [c["token_ids"] for c in r2["choices"]])
    print("(a) the n samples differ from each other:", len({tuple(s) for s in samples}) > 1)
    print("(a) choice[0] keys:", sorted(r1["choices"][0]))
    print("(a) logprobs keys:", sorted(r1["choices"][0]["logprobs"]))
    print("(a) choice[0].logprobs.tokens:", r1["choices"][0]["logprobs"]["tokens"])
    print("(a) choice[0].logprobs.top_logprobs[0]:", r1["choices"][0]["logprobs"]["top_logprobs"][0])
    # raw or temperature-processed?
    c0 = r1["choices"][0]
    d_raw = d_proc = 0.0
    for i, (t, lp) in enumerate(zip(c0["token_ids"], c0["logprobs"]["token_logprobs"])):
        ctx = prompt + c0["token_ids"][:i]
        d_raw = max(d_raw, abs(hf_logprobs(ctx, 1.0)[t].item() - lp))
        d_proc = max(d_proc, abs(hf_logprobs(ctx, T)[t].item() - lp))
    print(
        f"(a) sampled-token logprob vs HF log_softmax(logits): max|d|={d_raw:.3g}; "
        f"vs log_softmax(logits/T): max|d|={d_proc:.3g}"
    )

    # batch of token-id prompts + n: order of choices
    rb = post(comp, {"prompt": [prompt, prompt[:3]], "n": 2, "max_tokens": 2, "seed": 1, "return_token_ids": True})
    print(
        "(a) batch of 2 prompts x n=2 -> choice (index, prompt_token_ids):",
        [(c["index"], c["prompt_token_ids"]) for c in rb["choices"]],
    )

    # ---- (b) exact answer-token log-probs ---------------------------------------------
    ref = hf_logprobs(prompt)
    ref_yes, ref_no = ref[yes].item(), ref[no].item()
    print(
        f"(b) HF float32: logp(Yes)={ref_yes:.6f} logp(No)={ref_no:.6f}; "
        f"ranks: Yes={int((ref > ref[yes]).sum())} No={int((ref > ref[no]).sum())}"
    )

    # B1: logprob_token_ids on the first generated position (uses the prefix cache)
    t0 = time.time()
    rA = post(
        comp,
        {
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 2,
            "logprob_token_ids": [yes, no],
            "return_tokens_as_token_ids": True,
        },
    )
    dtA = time.time() - t0
    top = rA["choices"][0]["logprobs"]["top_logprobs"][0]
    print("(b1) logprob_token_ids top_logprobs[0]:", top)
    a_yes, a_no = top[f"token_id:{yes}"], top[f"token_id:{no}"]
    print(f"(b1) |d| Yes={abs(a_yes - ref_yes):.3g} No={abs(a_no - ref_no):.3g}  ({dtA:.3f}s)")

    # B2: answer appended to the prompt, echo + prompt_logprobs (skips prefix-cache reads)
    t0 = time.time()
    rB = post(
        comp,
        {
            "prompt": [prompt + [yes], prompt + [no]],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        },
    )
    dtB = time.time() - t0
    pl = [c["prompt_logprobs"] for c in rB["choices"]]
    print("(b2) prompt_logprobs[-1] shape:", pl[0][-1], "| prompt_logprobs[0]:", pl[0][0])
    b_yes, b_no = pl[0][-1][str(yes)]["logprob"], pl[1][-1][str(no)]["logprob"]
    print(f"(b2) |d| Yes={abs(b_yes - ref_yes):.3g} No={abs(b_no - ref_no):.3g}  ({dtB:.3f}s)")

    # B2': echo=true + max_tokens=0 (no generation, prompt_logprobs defaults to logprobs)
    rB0 = post(
        comp,
        {"prompt": prompt + [yes], "echo": True, "max_tokens": 0, "logprobs": 0, "return_tokens_as_token_ids": True},
    )
    lp0 = rB0["choices"][0]["logprobs"]
    print(
        "(b2') echo+max_tokens=0 tokens/token_logprobs tail:",
        lp0["tokens"][-2:],
        lp0["token_logprobs"][-2:],
        "| |d| Yes=",
        abs(lp0["token_logprobs"][-1] - ref_yes),
    )

    # B3: allowed_token_ids=[yes, no]: which distribution are the logprobs of?
    rC = post(
        comp,
        {
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 1.0,
            "seed": 0,
            "logprobs": 2,
            "allowed_token_ids": [yes, no],
            "return_tokens_as_token_ids": True,
        },
    )
    topC = rC["choices"][0]["logprobs"]["top_logprobs"][0]
    print(
        "(b3) allowed_token_ids top_logprobs[0]:",
        topC,
        "| HF raw top-2:",
        {int(i): round(v.item(), 6) for v, i in zip(*ref.topk(2))},
    )
    renorm = ref[[yes, no]] - torch.logsumexp(ref[[yes, no]], 0)
    print(f"(b3) HF renormalised over {{Yes,No}}: {renorm.tolist()}")

    # many scoring calls on a shared prefix: prefix cache counters
    m0 = metrics(url)
    long_prefix = prompt * 20
    t0 = time.time()
    for k in range(8):
        post(
            comp,
            {
                "prompt": long_prefix + [100 + k],
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": 2,
                "logprob_token_ids": [yes, no],
            },
        )
    dt8 = time.time() - t0
    m1 = metrics(url)
    print(
        f"(c) 8 scoring calls, shared {len(long_prefix)}-token prefix: {dt8:.3f}s; prefix-cache metric deltas:",
        {k: m1[k] - m0.get(k, 0.0) for k in m1},
    )
    assert math.isfinite(a_yes)


if __name__ == "__main__":
    main()
