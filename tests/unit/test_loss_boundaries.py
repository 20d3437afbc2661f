"""Loss terms exactly at, just inside and just past their clipping boundaries.

Ratios are exp(logp - old_logp); the values used (1.25, 0.75, 1.5, 0.5, 4, 2) come out of exp(log v)
exactly in float64, which the first test asserts, so "at the boundary" really is at it.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlme_pipeline.algorithm.losses import token_terms, token_weights

EPS, EPS_HIGH = 0.25, 4.0


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _at(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, old_logp) whose ratio is each given value; logp = log r, old = 0."""
    return _t([math.log(r) for r in ratios]).requires_grad_(), _t([0.0] * len(ratios))


def test_the_ratios_are_exact():
    logp, old = _at([1.25, 0.75, 1.5, 0.5, 4.0, 2.0])
    assert torch.exp(logp - old).tolist() == [1.25, 0.75, 1.5, 0.5, 4.0, 2.0]


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo"])
def test_ppo_clip_at_and_past_both_edges(kind):
    #        ratio  A     loss                  clipped  gradient flows
    cases = [
        (1.25, 1.0, -1.25, 0.0, True),  # upper edge, A > 0: clip and ratio agree, not clipped
        (1.5, 1.0, -1.25, 1.0, False),  # past it: the clipped objective wins, no gradient
        (1.5, -1.0, 1.5, 0.0, True),  # past it with A < 0: the unclipped (pessimistic) term wins
        (0.75, -1.0, 0.75, 0.0, True),  # lower edge, A < 0
        (0.5, -1.0, 0.75, 1.0, False),  # past it: clipped at 1 - eps
        (0.5, 1.0, -0.5, 0.0, True),  # past it with A > 0: unclipped wins
        (1.5, 2.0, -2.5, 1.0, False),  # |A| != 1: the clipped objective is (1 + eps) * A
        (0.5, -4.0, 3.0, 1.0, False),  # and (1 - eps) * A on the other side
        (1.0, 0.0, 0.0, 0.0, True),
    ]  # no advantage: no loss
    logp, old = _at([c[0] for c in cases])
    adv = _t([c[1] for c in cases])
    terms, st = token_terms(kind, logp, old, adv, eps=EPS, eps_high=EPS_HIGH)
    assert terms.tolist() == [c[2] for c in cases]
    assert st["clipped"].tolist() == [c[3] for c in cases]
    assert "kl" not in st
    terms.sum().backward()
    for g, (r, a, _, _, flows) in zip(logp.grad.tolist(), cases):
        # d(-r*A)/dlogp = -r*A where the unclipped term is active (ties at the edge share it via minimum)
        if not flows:
            assert g == 0.0, (r, a)
        elif a != 0.0:
            assert g != 0.0 and math.copysign(1, g) == -math.copysign(1, a), (r, a)


def test_cispo_cap_at_and_past_eps_high():
    logp, old = _at([4.0, 2.0, 1.0])
    past = _t([math.log(4.0) + 0.5]).requires_grad_()
    adv = _t([1.0, -1.0, 2.0])
    terms, st = token_terms("cispo", logp, old, adv, eps=EPS, eps_high=EPS_HIGH)
    assert terms.tolist() == [-4.0 * math.log(4.0), 2.0 * math.log(2.0), -0.0]
    assert st["clipped"].tolist() == [0.0, 0.0, 0.0]
    terms.sum().backward()
    assert logp.grad.tolist() == [-4.0, 2.0, -2.0]  # d/dlogp = -sg(min(r, eps_high)) * A
    t2, st2 = token_terms("cispo", past, _t([0.0]), _t([1.0]), eps=EPS, eps_high=EPS_HIGH)
    assert st2["clipped"].tolist() == [1.0] and t2.item() == -4.0 * past.item()
    t2.backward()
    assert past.grad.item() == -4.0  # capped weight, gradient kept


def test_kl_only_with_a_positive_beta():
    logp, old = _at([1.0, 1.0])
    ref = _t([0.0, math.log(2.0)])
    plain, st = token_terms("cispo", logp, old, _t([0.0, 0.0]), eps=EPS, eps_high=EPS_HIGH, ref_logp=ref, beta=0.0)
    assert "kl" not in st and plain.tolist() == [0.0, 0.0]
    terms, st = token_terms("grpo", logp, old, _t([0.0, 0.0]), eps=EPS, eps_high=EPS_HIGH, ref_logp=ref, beta=0.5)
    d = math.log(2.0)  # ref - logp for the second token; 0 for the first
    assert st["kl"].tolist() == pytest.approx([0.0, 2.0 - d - 1.0], abs=1e-15)
    assert terms.tolist() == pytest.approx([0.0, 0.5 * (2.0 - d - 1.0)], abs=1e-15)
    with pytest.raises(AssertionError, match=r"^beta > 0 needs reference log-probs$"):
        token_terms("cispo", logp, old, _t([0.0, 0.0]), eps=EPS, eps_high=EPS_HIGH, beta=0.1)


def test_token_weights_exactly():
    assert token_weights("cispo", [3, 1], n_seqs=4, n_tokens=8, max_new_tokens=16).tolist() == [0.125] * 4
    assert token_weights("grpo", [2, 4], n_seqs=2, n_tokens=6, max_new_tokens=16).tolist() == [0.25, 0.25] + [0.125] * 4
    assert token_weights("dr_grpo", [2, 1], n_seqs=2, n_tokens=3, max_new_tokens=8).tolist() == [0.0625] * 3
    assert token_weights("cispo", [], n_seqs=2, n_tokens=4, max_new_tokens=8).shape == (0,)  # an empty micro-batch
