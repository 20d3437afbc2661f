"""Run the contract scenarios through the in-process vllm backend; run with the vLLM venv's python:

PYTHONPATH=REPO VENV/bin/python tests/backends/vllm_inproc.py MODEL_DIR < spec.json > out.json
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    from scenarios import run_scenarios

    from rlme_pipeline.backends.vllm import VLLMGenerator, VLLMJudge, load_llm

    spec = json.load(sys.stdin)
    t0 = time.perf_counter()
    llm = load_llm(sys.argv[1], "float32", enforce_eager=True, block_size=32)
    load_s = time.perf_counter() - t0
    out = run_scenarios(VLLMGenerator(llm), VLLMJudge(llm), spec)
    out["load_seconds"] = load_s
    print("RESULT " + json.dumps(out))
