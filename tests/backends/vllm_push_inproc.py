"""The trainer's tensors pushed into a running engine against a fresh engine on the saved checkpoint; run
with the vLLM venv's python (tests/backends/test_colocated.py does):

PYTHONPATH=REPO VENV/bin/python tests/backends/vllm_push_inproc.py BASE OUT DTYPE < spec.json

1. transformers loads BASE (float32, the trainer's master weights) and takes one AdamW step on a language
   modelling loss, then saves the result to OUT (the committed checkpoint);
2. one colocated engine (in this process) on BASE judges the spec, so its prefix cache holds the shared
   prefixes computed with the old weights, then gets the trained tensors by `push_weights` (no file);
3. after the push it judges, scores prompt log-probs and samples with seeds; the engine is shut down;
4. a fresh engine on OUT does the same. Prints RESULT {pushed, fresh, before, push_seconds, ...}.
"""

import json
import sys
import time
from dataclasses import asdict

sys.path.insert(0, __file__.rsplit("/", 1)[0])

if __name__ == "__main__":
    import torch
    from scenarios import MAX_NEW, TEMPERATURE
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rlme_pipeline.backends.vllm import VLLMGenerator, VLLMJudge, load_llm, push_weights, shutdown

    spec = json.load(sys.stdin)
    base, out, dtype = sys.argv[1:4]

    # 1. the trainer: one optimizer step, then the checkpoint it commits
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for ids in (torch.tensor([p + spec["questions"][0]]) for p in spec["prefixes"][:3]):
        model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)

    def engine_results(llm) -> dict:
        judged = VLLMJudge(llm).judge(spec["prefixes"], spec["questions"], spec["yes"], spec["no"])
        ids = spec["prefixes"][0]
        lp = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        kw = dict(max_new_tokens=MAX_NEW, temperature=TEMPERATURE, top_p=1.0)
        return {
            "judge": [[asdict(j) for j in row] for row in judged],
            "prompt_logprobs": [d[t].logprob for d, t in zip(lp.prompt_logprobs[1:], ids[1:])],
            "samples": [asdict(s) for s in VLLMGenerator(llm).sample(spec["prompts"], spec["seeds"], **kw)],
        }

    engine = dict(enforce_eager=True, block_size=32)
    llm = load_llm(base, dtype, colocate=True, **engine)
    before = engine_results(llm)  # fills the prefix cache with blocks computed with the old weights
    t0 = time.perf_counter()
    push_weights(llm, model.state_dict().items())
    push_seconds = time.perf_counter() - t0
    hits = llm.generate([TokensPrompt(prompt_token_ids=spec["prefixes"][0])], SamplingParams(max_tokens=1))[0]
    pushed = engine_results(llm)
    shutdown(llm)
    del llm

    fresh_llm = load_llm(out, dtype, colocate=True, **engine)
    fresh = engine_results(fresh_llm)
    result = {"before": before, "pushed": pushed, "fresh": fresh, "push_seconds": push_seconds}
    result["cached_after_push"] = hits.num_cached_tokens  # the reset dropped the old prefix blocks
    print("RESULT " + json.dumps(result))
