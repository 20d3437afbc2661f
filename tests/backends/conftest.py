"""Fixtures for the backend contract suite: one vLLM server per session (startup is 30-110 s on 2 cores).

The `openai` and `vllm` backends need a virtualenv with vLLM (`make vllm-venv`, infra/vllm-venv.sh);
RLME_VLLM_PYTHON names its interpreter. Without it those tests skip and say so; `make test-vllm` sets it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
SERVER_ARGS = ["--enforce-eager", "--block-size", "32"]  # eager: no torch.compile at each start (tiny model)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    py = os.environ.get("RLME_VLLM_PYTHON")
    if not py:
        pytest.skip("RLME_VLLM_PYTHON is not set: no vLLM virtualenv (run `make test-vllm` to build one and run these)")
    if not Path(py).exists():
        pytest.fail(f"RLME_VLLM_PYTHON={py} does not exist")
    return py


@pytest.fixture(scope="session")
def vllm_server(vllm_python, tiny_models):
    from rlme_pipeline.backends.server import ManagedServer

    with ManagedServer(vllm_python, str(tiny_models["policy"]), args=SERVER_ARGS, env=VLLM_ENV) as srv:
        yield srv


@pytest.fixture(scope="session")
def spec(tiny_models) -> dict:
    from rlme_pipeline.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_models["policy"]))
    texts = ["Question: what is 2 + 2?", "Hello there, how are you today?", "Name three prime numbers."]
    prompts = [tok(t)["input_ids"] for t in texts]
    prefixes = [tok(f"Question: {t}\nResponse: I think so.\n")["input_ids"] for t in texts]
    prefixes.append(tok("word " * 1100)["input_ids"])  # longer than max_position_embeddings: context_overflow
    one = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return {
        "prompts": prompts + prompts[:1],
        "seeds": [11, 12, 13, 14],  # the same prompt twice, other seed
        "prefixes": prefixes,
        "questions": [one(" Is the answer correct? Answer Yes or No.\nAnswer:"), one(" Is it polite?\nAnswer:")],
        "yes": sorted({one(" Yes")[0], one("Yes")[0]}),
        "no": sorted({one(" No")[0], one("No")[0]}),
    }


def run_inproc_vllm(vllm_python: str, model: str, spec: dict, script: str = "vllm_inproc.py", *args: str) -> dict:
    """Run one of this folder's in-process vLLM scripts in the vLLM venv (spec on stdin) and return the JSON
    it prints on its last `RESULT ` line; its stderr tail on failure."""
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(ROOT), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    p = subprocess.run(
        [vllm_python, str(HERE / script), model, *args],
        input=json.dumps(spec),
        text=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stderr[-6000:])
        raise AssertionError(f"in-process vllm run failed (exit {p.returncode}); stderr tail above")
    return json.loads(lines[-1].removeprefix("RESULT "))


def direct_judgements_of(model, spec: dict) -> list[list[tuple[float, float]]]:
    """(log P(yes), log P(no)) from one full forward pass per prefix + question: the reference every
    backend's prefix-shared, packed judging must reproduce (the over-long last prefix excluded)."""
    import torch

    out = []
    with torch.no_grad():
        for prefix in spec["prefixes"][:-1]:
            row = []
            for q in spec["questions"]:
                lp = torch.log_softmax(model(torch.tensor([prefix + q])).logits[0, -1].float(), -1)
                row.append((torch.logsumexp(lp[spec["yes"]], 0).item(), torch.logsumexp(lp[spec["no"]], 0).item()))
            out.append(row)
    return out
