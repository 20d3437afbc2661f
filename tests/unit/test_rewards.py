"""Reward aggregation: weights, floors, forms, NaN for failed judgements, group-centred advantages."""

from __future__ import annotations

import math

import polars as pl
import pytest

from rlme_pipeline.algorithm.rewards import compute_rewards

FLOOR = math.log(1e-6)
ROLLOUTS = pl.DataFrame({"rollout_id": ["a", "b", "c", "d"], "prompt_id": ["p", "p", "p", "q"], "iteration": [0] * 4})


def _scores(rows):
    cols = ["rollout_id", "evaluator", "question_id", "logp_yes", "logp_no", "status"]
    df = pl.DataFrame(rows, schema=cols, orient="row")
    return df.with_columns(p_yes=1 / (1 + (pl.col("logp_no") - pl.col("logp_yes")).exp()))


def _rewards(scores, form="logp", v=None, w=None, scale_std=False):
    v = v or {"e1": 1.0, "e2": 0.5}
    w = w or {"x": 1.0, "y": -2.0}
    out = compute_rewards(scores, ROLLOUTS, v, w, form=form, floor=FLOOR, scale_std=scale_std)
    return {r["rollout_id"]: r for r in out.iter_rows(named=True)}


FULL = [
    (rid, e, q, ly, -1.0, "ok")
    for rid, base in (("a", -0.5), ("b", -1.0), ("c", -2.0), ("d", -0.1))
    for e, shift in (("e1", 0.0), ("e2", -0.25))
    for q, ly in (("x", base + shift), ("y", -50.0 if rid == "b" else base + shift - 1))
]


def test_weighted_sum_with_floor():
    r = _rewards(_scores(FULL))
    # a: e1 -> 1*(-0.5) + -2*(-1.5) = 2.5 ; e2 -> 0.5*(1*(-0.75) + -2*(-1.75)) = 1.375
    assert r["a"]["reward"] == pytest.approx(2.5 + 1.375)
    # b: question y's log p of -50 is floored at log 1e-6 before weighting (a negative weight rewards it)
    b = 1 * -1.0 + -2 * FLOOR + 0.5 * (1 * -1.25 + -2 * FLOOR)
    assert r["b"]["reward"] == pytest.approx(b)
    assert r["a"]["n_components"] == 4 and r["a"]["n_failed"] == 0


def test_advantage_is_reward_minus_group_mean_and_optional_std_scaling():
    r = _rewards(_scores(FULL))
    group = [r[x]["reward"] for x in "abc"]
    mean = sum(group) / 3
    for x in "abc":
        assert r[x]["advantage"] == pytest.approx(r[x]["reward"] - mean)
    assert r["d"]["advantage"] == pytest.approx(0.0)  # a group of one has nothing to compare to
    s = _rewards(_scores(FULL), scale_std=True)
    std = (sum((g - mean) ** 2 for g in group) / 3) ** 0.5
    assert s["a"]["advantage"] == pytest.approx((r["a"]["reward"] - mean) / (std + 1e-6))


def test_failed_or_missing_judgement_is_nan_not_zero_and_left_out_of_the_mean():
    rows = [
        row if not (row[0] == "c" and row[1] == "e2" and row[2] == "x") else (*row[:3], None, None, "context_overflow")
        for row in FULL
    ]
    rows = [row for row in rows if not (row[0] == "d" and row[2] == "y")]  # d is missing components
    r = _rewards(_scores(rows))
    assert math.isnan(r["c"]["reward"]) and math.isnan(r["c"]["advantage"]) and r["c"]["n_failed"] == 1
    assert math.isnan(r["d"]["reward"]) and r["d"]["n_failed"] == 2
    mean = (r["a"]["reward"] + r["b"]["reward"]) / 2
    assert r["a"]["advantage"] == pytest.approx(r["a"]["reward"] - mean)


def test_reward_forms():
    one = [("a", "e1", "x", math.log(0.2), math.log(0.6), "ok")]
    for form, expected in (("p", 0.2), ("logp", math.log(0.2)), ("norm_logp", math.log(0.2 / 0.8))):
        r = _rewards(_scores(one), form=form, v={"e1": 1.0}, w={"x": 1.0})
        assert r["a"]["reward"] == pytest.approx(expected), form
    with pytest.raises(ValueError, match="reward_form"):
        _rewards(_scores(one), form="bogus", v={"e1": 1.0}, w={"x": 1.0})
