"""The calls every backend answers in the contract suite, as plain data in and out (JSON-able), so the
in-process vllm backend can run them in the vLLM virtualenv (vllm_inproc.py) and the test compares.
Only the standard library and rlme_pipeline.backends are imported here."""

from __future__ import annotations

from dataclasses import asdict

TEMPERATURE, TOP_P, MAX_NEW = 0.7, 1.0, 12


def run_scenarios(gen, judge, spec: dict) -> dict:
    prompts, seeds = spec["prompts"], spec["seeds"]
    kw = dict(max_new_tokens=MAX_NEW, temperature=TEMPERATURE, top_p=TOP_P)
    out = {
        "batch": [asdict(s) for s in gen.sample(prompts, seeds, **kw)],
        "again": [asdict(s) for s in gen.sample(prompts, seeds, **kw)],
        # the second request on its own: a sample must not depend on its batch
        "single": [asdict(s) for s in gen.sample(prompts[1:2], seeds[1:2], **kw)],
        "judge": [
            [asdict(j) for j in row]
            for row in judge.judge(spec["prefixes"], spec["questions"], spec["yes"], spec["no"])
        ],
        "max_positions": judge.max_positions,
    }
    return out
