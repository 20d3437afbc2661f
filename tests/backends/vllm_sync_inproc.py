"""The in-process vllm backend taking new weights without a new engine; run with the vLLM venv's python:

PYTHONPATH=REPO VENV/bin/python tests/backends/vllm_sync_inproc.py BASE ADAPTER_DIR OTHER_WEIGHTS < spec.json

One LLM on BASE (LoRA enabled); judgements of the spec with the base, with the adapter, after syncing
OTHER_WEIGHTS in place, and after syncing BASE back. Prints RESULT {name: judgements, ...}.
"""

import json
import sys
import time
from dataclasses import asdict

if __name__ == "__main__":
    from rlme_pipeline.backends.vllm import VLLMJudge, adapter, load_llm, sync_weights

    spec = json.load(sys.stdin)
    base, adapter_dir, other = sys.argv[1:4]
    llm = load_llm(base, "float32", enforce_eager=True, block_size=32, enable_lora=True, max_lora_rank=8)

    def judge(lora=None):
        rows = VLLMJudge(llm, lora).judge(spec["prefixes"], spec["questions"], spec["yes"], spec["no"])
        return [[asdict(j) for j in row] for row in rows]

    out, seconds = {"base": judge()}, {}
    t0 = time.perf_counter()
    lora = adapter(llm, "adapter-hash", adapter_dir)
    seconds["adapter"] = time.perf_counter() - t0
    out["adapter"] = judge(lora)
    for name, path in (("other", other), ("base_again", base)):
        t0 = time.perf_counter()
        assert sync_weights(llm, path) and not sync_weights(llm, path)  # the second is a no-op
        seconds[name] = time.perf_counter() - t0
        out[name] = judge()
    out["seconds"] = seconds
    print("RESULT " + json.dumps(out))
