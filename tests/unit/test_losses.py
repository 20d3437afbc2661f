"""Loss terms and normalisations against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlme_pipeline.algorithm.losses import token_terms, token_weights

# Three tokens: sequence A = tokens 0, 1; sequence B = token 2.
LOGP = [-1.0, -2.0, -0.5]
OLD = [-1.0, -2.5, -3.0]  # ratios 1, e^0.5 = 1.6487, e^2.5 = 12.18
ADV = [1.0, 1.0, -2.0]


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_cispo_caps_the_detached_weight_and_keeps_every_gradient():
    logp = _t(LOGP).requires_grad_()
    terms, st = token_terms("cispo", logp, _t(OLD), _t(ADV), eps=0.2, eps_high=5.0)
    w = [1.0, math.exp(0.5), 5.0]  # third ratio 12.18 is capped at eps_high
    expected = [-w[0] * 1 * -1.0, -w[1] * 1 * -2.0, -w[2] * -2 * -0.5]
    assert terms.tolist() == pytest.approx(expected)
    assert st["clipped"].tolist() == [0.0, 0.0, 1.0]
    loss = (terms * token_weights("cispo", [2, 1], n_seqs=2, n_tokens=3, max_new_tokens=4)).sum()
    assert loss.item() == pytest.approx(sum(expected) / 3)
    loss.backward()
    # d/dlogp = -sg(w) * A / N: the capped token still has a gradient (unlike PPO clipping)
    assert logp.grad.tolist() == pytest.approx([-w[0] / 3, -w[1] / 3, 2 * w[2] / 3])


def test_cispo_at_the_clipping_boundary():
    # exp(log 4) is exactly 4.0 in float64 (exp(log 5) is not): the ratio really sits on eps_high
    at = _t([math.log(4.0)])
    assert torch.exp(at - _t([0.0])).item() == 4.0
    terms, st = token_terms("cispo", at, _t([0.0]), _t([1.0]), eps=0.2, eps_high=4.0)
    assert st["clipped"].item() == 0.0  # ratio == eps_high is not clipped
    assert terms.item() == -4.0 * math.log(4.0)


def test_grpo_ppo_clip_and_sequence_mean():
    logp = _t(LOGP).requires_grad_()
    terms, st = token_terms("grpo", logp, _t(OLD), _t(ADV), eps=0.2, eps_high=5.0)
    r = [1.0, math.exp(0.5), math.exp(2.5)]
    # token 1: A>0 and ratio > 1.2, so the clipped objective 1.2 is the min; token 2: A<0, unclipped is the min
    expected = [-1.0, -1.2, -(r[2] * -2.0)]
    assert terms.tolist() == pytest.approx(expected)
    assert st["clipped"].tolist() == [0.0, 1.0, 0.0]
    w = token_weights("grpo", [2, 1], n_seqs=2, n_tokens=3, max_new_tokens=4)
    assert w.tolist() == pytest.approx([1 / 4, 1 / 4, 1 / 2])  # mean over sequences of token means
    (terms * w).sum().backward()
    assert logp.grad[1].item() == 0.0  # a clipped token has no gradient
    assert logp.grad[0].item() == pytest.approx(-1.0 * r[0] / 4)


def test_dr_grpo_uses_a_constant_normaliser():
    w = token_weights("dr_grpo", [2, 1], n_seqs=2, n_tokens=3, max_new_tokens=4)
    assert w.tolist() == pytest.approx([1 / 8] * 3)
    terms, _ = token_terms("dr_grpo", _t(LOGP), _t(OLD), _t(ADV), eps=0.2, eps_high=5.0)
    assert (terms * w).sum().item() == pytest.approx((-1.0 - 1.2 + 2 * math.exp(2.5)) / 8)


def test_k3_kl_is_added_with_beta():
    logp, ref = _t([-1.0, -2.0]), _t([-1.5, -1.0])
    base, _ = token_terms("cispo", logp, logp.clone(), _t([0.0, 0.0]), eps=0.2, eps_high=5.0)
    terms, st = token_terms("cispo", logp, logp.clone(), _t([0.0, 0.0]), eps=0.2, eps_high=5.0, ref_logp=ref, beta=0.1)
    d = [-0.5, 1.0]
    kl = [math.exp(x) - x - 1 for x in d]
    assert st["kl"].tolist() == pytest.approx(kl)
    assert (terms - base).tolist() == pytest.approx([0.1 * k for k in kl])
    assert all(k >= 0 for k in kl)


def test_step_weights_make_accumulation_equal_the_full_step():
    """Micro-batches weighted by step totals sum to the loss of the whole step at once."""
    lens = [3, 1, 2, 4]
    torch.manual_seed(0)
    logp, old, adv = torch.randn(10), torch.randn(10), torch.randn(4).repeat_interleave(torch.tensor(lens))
    for kind in ("cispo", "grpo", "dr_grpo"):
        terms, _ = token_terms(kind, logp, old, adv, eps=0.2, eps_high=5.0)
        full = (terms * token_weights(kind, lens, 4, 10, 5)).sum()
        first = (terms[:4] * token_weights(kind, lens[:2], 4, 10, 5)).sum()
        second = (terms[4:] * token_weights(kind, lens[2:], 4, 10, 5)).sum()
        assert (first + second).item() == pytest.approx(full.item())


def test_token_values_are_float32_on_the_log_probs_device():
    """Built where the log-probs live (the meta device stands for a GPU here: a tensor left on the CPU would
    be moved every micro-batch), in float32 whatever the Python floats."""
    from rlme_pipeline.algorithm.losses import per_token, token_weights

    assert per_token([1.0, -2.0], [2, 1], "cpu").tolist() == [1.0, 1.0, -2.0]
    assert per_token([1, -2], [2, 1], "cpu").dtype == torch.float32  # integer values too (not int64)
    for t in (per_token([1.0, -2.0], [2, 1], "meta"), token_weights("cispo", [2, 1], 2, 3, 8, "meta")):
        assert t.device.type == "meta" and t.dtype == torch.float32 and t.shape == (3,)
