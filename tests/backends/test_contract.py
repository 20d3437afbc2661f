"""The backend contract: every generation/scoring backend passes the same checks on the same tiny model.

- shapes: one sample per (prompt, seed), token ids and log-probs of equal length <= max_new_tokens;
- determinism: the same seeds give the same samples, and a sample does not depend on its batch;
- log-probs: each sampled token's log-prob equals the hf trainer's log_softmax(logits / T) of that token
  (teacher-forced), and judgements equal a plain forward pass over prefix + question (no cache, no
  packing), within TOL (measured: < 5e-6, float32): the hf backend is checked against it like the others;
- an over-long prefix is a `context_overflow` judgement, not a number.

Samplers use different random streams (hf: our Gumbel noise per seed; vLLM: its per-request seed), so
samples are compared per backend, and values across backends on the same tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.backends.conftest import SERVER_ARGS, direct_judgements_of, run_inproc_vllm  # noqa: F401
from tests.backends.scenarios import MAX_NEW, TEMPERATURE, run_scenarios

TOL = 1e-4  # |delta log p| allowed between backends; measured max ~1e-6 on the tiny float32 model
BACKENDS = ["hf", "openai", "vllm"]


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    from transformers import AutoModelForCausalLM

    from rlme_pipeline.models.loading import load_tokenizer

    path = str(tiny_models["policy"])
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)


def _hf_backends(hf_model):
    from rlme_pipeline.backends.hf import HFGenerator, HFJudge
    from rlme_pipeline.backends.session import eos_ids

    model, tok = hf_model
    return HFGenerator(model, eos_ids(model, tok), tok.pad_token_id), HFJudge(model, tok.pad_token_id)


@pytest.fixture(scope="module")
def hf_result(hf_model, spec):
    return run_scenarios(*_hf_backends(hf_model), spec)


_CACHE: dict[str, dict] = {}


@pytest.fixture(params=BACKENDS)
def result(request, spec, hf_result, tiny_models):
    name = request.param
    if name == "hf":
        return name, hf_result
    vllm_python = request.getfixturevalue("vllm_python")
    if name not in _CACHE:
        if name == "openai":
            from rlme_pipeline.backends.openai import Client, OpenAIGenerator, OpenAIJudge

            srv = request.getfixturevalue("vllm_server")
            client = Client(url=srv.url)
            _CACHE[name] = run_scenarios(OpenAIGenerator(client), OpenAIJudge(client, 1024), spec)
        else:
            _CACHE[name] = run_inproc_vllm(vllm_python, str(tiny_models["policy"]), spec)
            print(f"vllm.LLM load: {_CACHE[name]['load_seconds']:.1f} s")
    return name, _CACHE[name]


def test_shapes(result, spec, hf_model):
    _, r = result
    _, tok = hf_model
    assert len(r["batch"]) == len(spec["prompts"])
    for s in r["batch"]:
        assert 1 <= len(s["token_ids"]) == len(s["logprobs"]) <= MAX_NEW
        assert s["finish_reason"] in ("stop", "length")
        assert all(lp <= 0 and math.isfinite(lp) for lp in s["logprobs"])
        if s["finish_reason"] == "length":
            assert len(s["token_ids"]) == MAX_NEW
    assert len(r["judge"]) == len(spec["prefixes"]) and all(len(row) == len(spec["questions"]) for row in r["judge"])
    assert r["max_positions"] == 1024


def test_seeded_determinism_and_batch_independence(result):
    _, r = result
    assert r["again"] == r["batch"]
    assert r["single"][0]["token_ids"] == r["batch"][1]["token_ids"]
    assert r["single"][0]["logprobs"] == pytest.approx(r["batch"][1]["logprobs"], abs=TOL)
    # same prompt, other seed: another sample
    assert r["batch"][3]["token_ids"] != r["batch"][0]["token_ids"]


def test_sample_logprobs_match_the_trainer(result, spec, hf_model):
    """Behaviour log-probs are the trainer's log_softmax(logits / T) of the sampled tokens."""
    from rlme_pipeline.algorithm.logprobs import completion_logprobs

    _, r = result
    model, tok = hf_model
    pairs = [(p, s["token_ids"]) for p, s in zip(spec["prompts"], r["batch"])]
    with torch.no_grad():
        trainer = completion_logprobs(model, pairs, pad_id=tok.pad_token_id, temperature=TEMPERATURE, chunk_tokens=1024)
    behaviour = torch.tensor([x for s in r["batch"] for x in s["logprobs"]])
    delta = (trainer - behaviour).abs()
    print(f"{result[0]}: sampled-token |delta logp| max {delta.max():.2e} mean {delta.mean():.2e}")
    assert delta.max() < TOL


@pytest.fixture(scope="module")
def direct_judgements(hf_model, spec) -> list[list[tuple[float, float]]]:
    model, _ = hf_model
    return direct_judgements_of(model, spec)


def test_judgements_match_a_direct_forward_pass(result, direct_judgements):
    name, r = result
    worst = 0.0
    assert len(r["judge"][:-1]) == len(direct_judgements)
    for row, ref_row in zip(r["judge"][:-1], direct_judgements):
        assert len(row) == len(ref_row)
        for j, (ref_yes, ref_no) in zip(row, ref_row):
            assert j["status"] == "ok"
            worst = max(worst, abs(j["logp_yes"] - ref_yes), abs(j["logp_no"] - ref_no))
    print(f"{name}: judge |delta logp| vs a direct forward pass, max {worst:.2e}")
    assert worst < TOL
    assert all(j["status"] == "context_overflow" and j["logp_yes"] is None for j in r["judge"][-1])


def test_an_external_server_is_used_only_for_the_weights_it_serves(vllm_server, tiny_models):
    from rlme_pipeline.backends import BackendError
    from rlme_pipeline.backends.session import Backends
    from rlme_pipeline.config import VllmConfig
    from rlme_pipeline.models.weights_at import ModelRef

    with Backends(VllmConfig(url=vllm_server.url)) as backends:
        policy = ModelRef(str(tiny_models["policy"]), "v0", "float32", "cpu")
        with backends.generator(policy, "openai") as (gen, tok):
            s = gen.sample([tok("Hi")["input_ids"]], [5], max_new_tokens=2, temperature=1.0, top_p=1.0)
            assert len(s[0].token_ids) == 2
        with pytest.raises(BackendError, match="cannot follow"):
            with backends.generator(ModelRef(str(tiny_models["evaluator"]), "v1", "float32", "cpu"), "openai"):
                pass
