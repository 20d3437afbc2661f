"""Invariants checked on generated inputs (hypothesis): advantages centre each group, rewards follow
log P(yes) in the direction of their weight, floors hold, the label share is nested, answers compare by
value, and the packed, prefix-shared judge equals one plain forward pass per (prefix, question)."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlme_pipeline.algorithm.answers import extract_answer, is_correct, normalize
from rlme_pipeline.algorithm.label_reward import selected
from rlme_pipeline.algorithm.rewards import compute_rewards, with_advantages

FLOOR = math.log(1e-6)
FAST = settings(max_examples=60, deadline=None)

reward = st.floats(-50.0, 5.0, allow_nan=False) | st.just(float("nan"))
groups = st.lists(st.lists(reward, min_size=1, max_size=6), min_size=1, max_size=4)


def _frame(gs: list[list[float]]) -> pl.DataFrame:
    rows = [(f"g{g}-{i}", f"g{g}", r) for g, rs in enumerate(gs) for i, r in enumerate(rs)]
    return pl.DataFrame(
        rows, schema={"rollout_id": pl.String, "prompt_id": pl.String, "reward": pl.Float64}, orient="row"
    )


@FAST
@given(groups, st.booleans())
def test_advantages_sum_to_zero_per_group_and_nan_stays_nan(gs, scale_std):
    out = with_advantages(_frame(gs), scale_std)
    for (pid,), g in out.group_by(["prompt_id"]):
        finite = [a for r, a in zip(g["reward"], g["advantage"]) if not math.isnan(r)]
        assert all(math.isnan(a) for r, a in zip(g["reward"], g["advantage"]) if math.isnan(r))
        assert all(math.isfinite(a) for a in finite)
        rs = [r for r in g["reward"] if not math.isnan(r)]
        spread = math.sqrt(sum((r - sum(rs) / len(rs)) ** 2 for r in rs) / len(rs)) + 1e-6 if rs else 1.0
        tol = 1e-10 * max([abs(r) for r in rs] + [1.0]) * max(len(rs), 1) / (spread if scale_std else 1.0)
        assert abs(sum(finite)) <= tol, pid
        if scale_std and len(finite) > 1:
            # scaled advantages have (up to the guard) unit spread unless the group is constant
            var = sum(a * a for a in finite) / len(finite)
            assert var <= 1.0 + 1e-9


@FAST
@given(groups, st.floats(-10, 10, allow_nan=False), st.floats(0.1, 10, allow_nan=False))
def test_advantages_ignore_a_shift_and_scale_linearly(gs, shift, factor):
    base = with_advantages(_frame(gs))["advantage"].to_list()
    moved = with_advantages(_frame([[r * factor + shift for r in g] for g in gs]))["advantage"].to_list()
    for a, b in zip(base, moved):
        assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(
            a * factor, rel=1e-9, abs=1e-9 * (1 + abs(shift)) * factor * 50
        )


def _reward_of(logp_yes: float, logp_no: float, form: str, weight: float) -> float:
    rollouts = pl.DataFrame({"rollout_id": ["a"], "prompt_id": ["p"], "iteration": [0]})
    p_yes = 1.0 / (1.0 + math.exp(min(logp_no - logp_yes, 700.0)))
    scores = pl.DataFrame(
        {
            "rollout_id": ["a"],
            "evaluator": ["e"],
            "question_id": ["k"],
            "logp_yes": [logp_yes],
            "logp_no": [logp_no],
            "p_yes": [p_yes],
            "status": ["ok"],
        }
    )
    return compute_rewards(scores, rollouts, {"e": 1.0}, {"k": weight}, form=form, floor=FLOOR)["reward"][0]


logp = st.floats(-60.0, 0.0, allow_nan=False)


@FAST
@given(logp, logp, st.sampled_from(["logp", "norm_logp", "p"]), st.sampled_from([1.0, 0.5, -2.0]), st.floats(-5.0, 0.0))
def test_rewards_are_monotone_in_log_p_yes_in_the_weights_direction(a, b, form, weight, logp_no):
    lo, hi = sorted((a, b))
    r_lo, r_hi = _reward_of(lo, logp_no, form, weight), _reward_of(hi, logp_no, form, weight)
    assert (r_hi >= r_lo) if weight > 0 else (r_hi <= r_lo)


@FAST
@given(
    st.floats(-1e6, 0.0, allow_nan=False), st.floats(-1e6, 0.0, allow_nan=False), st.sampled_from(["logp", "norm_logp"])
)
def test_log_forms_never_go_below_the_floor(logp_yes, logp_no, form):
    r = _reward_of(logp_yes, logp_no, form, 1.0)
    assert r >= FLOOR
    if form == "logp":
        assert r == max(logp_yes, FLOOR)


@FAST
@given(st.text(min_size=1, max_size=12), st.floats(0, 1), st.floats(0, 1))
def test_the_label_share_is_nested(rid, s, t):
    lo, hi = sorted((s, t))
    assert not selected(rid, lo) or selected(rid, hi)  # a larger share keeps every rollout a smaller one picked
    assert selected(rid, 1.0) and not selected(rid, 0.0)


@FAST
@given(st.integers(-(10**9), 10**9), st.sampled_from(["", ".", ".0", ".00"]))
def test_numbers_compare_by_value(n, tail):
    text = f"{n:,}{tail}"  # 1,234,567.0 == 1234567
    assert normalize(text) == str(n)
    assert is_correct(f"Let me think. The answer is {text}.", str(n))
    assert is_correct(f"The answer is {text}", str(n), "answer_is")
    assert is_correct(f"so \\boxed{{{text}}}", str(n), "boxed")
    assert is_correct(f"{n + 1} then {text}", str(n), "last_number")
    assert not is_correct(f"The answer is {n + 1}.", str(n))
    assert normalize(normalize(text)) == normalize(text)
    assert extract_answer(f"The answer is {text}. Then 7.") == str(n)


# --- the packed judge ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_models["evaluator"]), dtype=torch.float32).eval()


tokens = st.lists(st.integers(3, 500), min_size=1, max_size=24)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(tokens, min_size=1, max_size=3),
    st.lists(st.lists(st.integers(3, 500), min_size=1, max_size=6), min_size=1, max_size=4),
    st.lists(st.integers(3, 500), min_size=1, max_size=2, unique=True),
    st.lists(st.integers(3, 500), min_size=1, max_size=2, unique=True),
)
def test_packed_questions_equal_direct_forward_passes(evaluator, prefixes, questions, yes, no):
    from rlme_pipeline.backends.hf import judge

    got = judge(evaluator, prefixes, questions, yes, no, pad_id=0, max_positions=1024)
    assert len(got) == len(prefixes) and all(len(row) == len(questions) for row in got)
    with torch.no_grad():
        for b, prefix in enumerate(prefixes):
            for k, q in enumerate(questions):
                lp = torch.log_softmax(evaluator(torch.tensor([prefix + q])).logits[0, -1].float(), -1)
                j = got[b][k]
                assert j.status == "ok"
                assert j.logp_yes == pytest.approx(torch.logsumexp(lp[yes], 0).item(), abs=1e-4)
                assert j.logp_no == pytest.approx(torch.logsumexp(lp[no], 0).item(), abs=1e-4)
