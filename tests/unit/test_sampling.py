"""The sampler: its uniforms are a function of (seed, step) alone, its tokens follow softmax(logits / T)
with top-p, and a row's completion depends only on its prompt and seed, never on its batch."""

from __future__ import annotations

import pytest
import torch

from rlme_pipeline.algorithm import sampling
from rlme_pipeline.algorithm.sampling import draw, uniforms
from rlme_pipeline.seeds import derive

SEEDS = [0, 1, 2, 3, -1, -(1 << 63), (1 << 63) - 1, (1 << 32) - 1, 1 << 32, derive(7, 0, "p", 3), derive(7, 0, "p", 4)]


def _reference_uniform(seed: int, step: int) -> float:
    """The same hash written with plain Python integers, independent of the tensor arithmetic."""

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    def lane(c):
        word = seed % (1 << 64)  # as unsigned 64 bits
        return fmix(fmix(fmix(step ^ c) ^ (word & 0xFFFFFFFF)) ^ (word >> 32)) >> 6

    return (lane(0x9E3779B9) * (1 << 26) + lane(0x7F4A7C15)) / 2.0**52


def test_uniforms_equal_a_plain_python_reference():
    u = uniforms(torch.tensor(SEEDS), 40)
    assert u.dtype == torch.float64 and u.shape == (len(SEEDS), 40)
    assert u.tolist() == [[_reference_uniform(s, t) for t in range(40)] for s in SEEDS]


def test_uniforms_of_a_row_do_not_depend_on_the_others_or_the_length():
    u = uniforms(torch.tensor(SEEDS), 30)
    assert torch.equal(uniforms(torch.tensor(SEEDS[3:5]), 12), u[3:5, :12])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the benchmark checks it on a GPU)")
def test_uniforms_are_identical_on_cuda():
    assert torch.equal(uniforms(torch.tensor(SEEDS, device="cuda"), 64).cpu(), uniforms(torch.tensor(SEEDS), 64))


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_uniforms_are_uniform_and_steps_uncorrelated():
    u = uniforms(torch.arange(2000) * 7919 + 11, 50)
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert _chi2(counts, torch.full((20,), 1 / 20)) < 60  # 19 dof: mean 19, p(>60) ~ 4e-6
    a, b = u[:, :-1].flatten() - 0.5, u[:, 1:].flatten() - 0.5
    assert abs(float((a * b).mean() / (a * a).mean())) < 0.02  # ~98,000 pairs: sd of the correlation ~0.003


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, float("-inf"), 1.5, -2.0])
N = 40_000


def _draws(temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    u = uniforms(torch.arange(N) + 123, 2)[:, 1]
    return draw(LOGITS.expand(N, -1), u, temperature, top_p)


@pytest.fixture(params=[1024, 4], ids=["one-block", "blocks-of-4"])
def block(request, monkeypatch):
    """The two-level search with the vocabulary in one block, and in blocks of 4 (the last one padded)."""
    monkeypatch.setattr(sampling, "BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_frequencies_follow_the_tempered_softmax(temperature, block):
    ids, logp = _draws(temperature, 1.0)
    probs = torch.softmax(LOGITS / temperature, -1)
    counts = torch.bincount(ids, minlength=len(LOGITS)).float()
    assert counts[7] == 0  # -inf: never
    assert _chi2(counts, probs) < 45  # 8 dof: mean 8, p(>45) ~ 4e-7
    assert torch.allclose(logp, torch.log_softmax(LOGITS / temperature, -1)[ids])


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.97])
def test_top_p_samples_the_renormalised_nucleus(top_p, block):
    ids, logp = _draws(0.9, top_p)
    probs = torch.softmax(LOGITS / 0.9, -1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[(sorted_p.cumsum(0) - sorted_p) < top_p]  # the smallest set whose mass reaches top_p
    truncated = torch.zeros_like(probs)
    truncated[nucleus] = probs[nucleus] / probs[nucleus].sum()
    counts = torch.bincount(ids, minlength=len(LOGITS)).float()
    assert counts[truncated == 0].sum() == 0
    assert _chi2(counts, truncated) < 45
    assert torch.allclose(logp, torch.log_softmax(LOGITS / 0.9, -1)[ids])  # behaviour log-probs: before top-p


def test_a_one_token_nucleus_is_greedy(block):
    ids, _ = _draws(1.0, 1e-6)
    assert (ids == 0).all()


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_block_search_picks_what_a_full_cumulative_sum_picks(top_p):
    """Against the one-level inverse CDF over the whole (sorted) vocabulary, on 5,000 tokens (5 blocks)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 5000, generator=g) * 3
    logits[:, 4000:4100] = float("-inf")
    u = uniforms(torch.arange(300), 1)[:, 0]
    logp = torch.log_softmax(logits, -1)
    ranked, order = logp.sort(-1, descending=True) if top_p < 1 else (logp, None)
    p = ranked.exp()
    cum = p.cumsum(-1, dtype=torch.float64)
    last = ((cum - p) < top_p).sum(-1, keepdim=True) - 1
    pick = (cum <= u[:, None] * cum.gather(-1, last)).sum(-1, keepdim=True)
    expected = (pick if order is None else order.gather(-1, pick))[:, 0]
    ids, lp = draw(logits, u, 1.0, top_p)
    assert torch.equal(ids, expected)
    assert torch.equal(lp, logp.gather(-1, ids[:, None])[:, 0])


# --- the hf sampling loop on the tiny policy -------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_models):
    from transformers import AutoModelForCausalLM

    from rlme_pipeline.models.loading import load_tokenizer

    path = str(tiny_models["policy"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, load_tokenizer(path)


def _sample(policy, prompts, seeds, **kw):
    from rlme_pipeline.backends.hf import sample

    model, tok = policy
    args = {
        "max_new_tokens": 10,
        "temperature": 0.8,
        "top_p": 0.95,
        "eos_ids": {tok.eos_token_id},
        "pad_id": tok.pad_token_id,
    }
    return sample(model, prompts, seeds, **{**args, **kw})


def _prompts(tok):
    texts = [
        "What is 2 + 2?",
        "Hello there, how are you on this fine and sunny day?",
        "Name a prime.",
        "Hi",
        "Count: 1 2 3",
    ]
    return [tok(t)["input_ids"] for t in texts]


def test_a_row_does_not_depend_on_its_batch(policy):
    _, tok = policy
    p = _prompts(tok)
    target, seed = p[0], 1234
    alone = _sample(policy, [target], [seed])[0]
    batches = [
        ([p[1], target, p[2]], [5, seed, 6], 1),
        ([p[4], p[3], p[2], p[1], target], [9, 8, 7, 6, seed], 4),  # longer neighbours: more left padding
        ([target, target], [seed, seed + 1], 0),  # the same prompt with another seed beside it
    ]
    for prompts, seeds, at in batches:
        s = _sample(policy, prompts, seeds)[at]
        assert s.token_ids == alone.token_ids
        assert s.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert s.finish_reason == alone.finish_reason
    assert _sample(policy, [target, target], [seed, seed + 1])[1].token_ids != alone.token_ids


def test_a_shorter_budget_gives_a_prefix(policy):
    _, tok = policy
    p, seeds = _prompts(tok), [3, 4, 5, 6, 7]
    short = _sample(policy, p, seeds, max_new_tokens=4)
    full = _sample(policy, p, seeds, max_new_tokens=12)
    for s, f in zip(short, full):
        assert s.token_ids == f.token_ids[: len(s.token_ids)]


def test_stopping_is_the_same_whichever_step_the_host_checks(policy):
    """Rows stop at different steps; how often the host looks changes nothing in the samples."""
    _, tok = policy
    p, seeds = _prompts(tok), [21, 22, 23, 24, 25]
    free = _sample(policy, p, seeds, max_new_tokens=12, eos_ids=set())
    stops = {free[0].token_ids[2], free[2].token_ids[5]}  # makes row 0 stop at step 3, row 2 by step 6
    every_step = _sample(policy, p, seeds, max_new_tokens=12, eos_ids=stops, eos_check_every=1)
    assert _sample(policy, p, seeds, max_new_tokens=12, eos_ids=stops, eos_check_every=5) == every_step
    for s, f in zip(every_step, free):
        assert s.token_ids == f.token_ids[: len(s.token_ids)]
        cut = [i for i, t in enumerate(s.token_ids) if t in stops]
        assert (s.finish_reason, cut) == (("stop", [len(s.token_ids) - 1]) if cut else ("length", []))
    assert len(every_step[0].token_ids) <= 3 and every_step[0].finish_reason == "stop"


def test_the_nucleus_ends_at_the_token_whose_mass_reaches_top_p_exactly():
    """At the boundary: top_p equal to the mass of the two likeliest tokens (summed as the sampler sums it:
    float32 probabilities, a float64 running sum) keeps those two only; a nucleus cut where the mass
    exceeds top_p, instead of where it reaches it, would take the third as well."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = torch.log_softmax(logits.float(), -1).exp()[0]
    top_p = float(p[:2].cumsum(0, dtype=torch.float64)[-1])
    near_one = torch.tensor([1 - 2.0**-40], dtype=torch.float64)  # uniforms are float64
    ids, _ = draw(logits, near_one, 1.0, top_p)
    assert ids.tolist() == [1]  # the top of the nucleus's CDF: its last token, never token 2
    ids, _ = draw(logits, near_one, 1.0, top_p + 1e-9)
    assert ids.tolist() == [2]  # a hair more mass asked for: the third token joins
