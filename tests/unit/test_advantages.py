"""Exact rewards and advantages for a fixed scores table, with and without std scaling, NaN masking.

One evaluator and one question of weight 1 under the `logp` form make each reward equal to the row's
log P(yes), so every expected number below is exact in binary floating point and written by hand.
"""

from __future__ import annotations

import math

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rlme_pipeline.algorithm.rewards import compute_rewards, with_advantages
from rlme_pipeline.config import validate_config
from rlme_pipeline.stages.aggregate import rewards_and_metrics, rewards_for

FLOOR = -20.0
EPS = 1e-6  # the std-scaling guard in rewards.with_advantages

# prompt -> rollout -> log P(yes) (None: the judgement failed)
TABLE = {
    "p": {"p0": 0.0, "p1": 0.0, "p2": -4.0, "p3": -4.0},  # mean -2, std 2
    "q": {"q0": -1.0, "q1": None, "q2": -3.0},  # a failed judgement: mean and std over q0, q2 only
    "s": {"s0": -7.5},  # a group of one
    "t": {"t0": -2.5, "t1": -2.5},  # equal rewards: std 0
    "u": {"u0": None, "u1": None},  # nothing to compare
}


def _tables(table=TABLE):
    ids = [(pid, rid, ly) for pid, g in table.items() for rid, ly in g.items()]
    rollouts = pl.DataFrame(
        {"rollout_id": [r for _, r, _ in ids], "prompt_id": [p for p, _, _ in ids], "iteration": [3] * len(ids)}
    )
    scores = pl.DataFrame(
        {
            "rollout_id": [r for _, r, _ in ids],
            "evaluator": ["e"] * len(ids),
            "question_id": ["k"] * len(ids),
            "logp_yes": [ly for _, _, ly in ids],
            "logp_no": [None if ly is None else -1.0 for _, _, ly in ids],
            "p_yes": [None if ly is None else 0.5 for _, _, ly in ids],
            "status": ["ok" if ly is not None else "context_overflow" for _, _, ly in ids],
        },
        schema_overrides={"logp_yes": pl.Float64, "logp_no": pl.Float64, "p_yes": pl.Float64},
    )
    return scores, rollouts


def _by_id(df: pl.DataFrame) -> dict[str, dict]:
    return {r["rollout_id"]: r for r in df.iter_rows(named=True)}


def _same(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == want


NAN = float("nan")
CENTRED = {
    "p0": 2.0,
    "p1": 2.0,
    "p2": -2.0,
    "p3": -2.0,
    "q0": 1.0,
    "q1": NAN,
    "q2": -1.0,
    "s0": 0.0,
    "t0": 0.0,
    "t1": 0.0,
    "u0": NAN,
    "u1": NAN,
}
SCALED = {
    "p0": 2.0 / (2.0 + EPS),
    "p1": 2.0 / (2.0 + EPS),
    "p2": -2.0 / (2.0 + EPS),
    "p3": -2.0 / (2.0 + EPS),
    "q0": 1.0 / (1.0 + EPS),
    "q1": NAN,
    "q2": -1.0 / (1.0 + EPS),
    "s0": 0.0,
    "t0": 0.0,
    "t1": 0.0,
    "u0": NAN,
    "u1": NAN,
}


@pytest.mark.parametrize("scale_std,want", [(False, CENTRED), (True, SCALED)], ids=["centred", "std-scaled"])
def test_exact_advantages(scale_std, want):
    scores, rollouts = _tables()
    out = compute_rewards(scores, rollouts, {"e": 1.0}, {"k": 1.0}, form="logp", floor=FLOOR, scale_std=scale_std)
    assert out.columns == ["rollout_id", "prompt_id", "iteration", "reward", "advantage", "n_components", "n_failed"]
    assert out["rollout_id"].to_list() == list(want)  # every rollout, in the rollouts' order
    got = _by_id(out)
    for rid, adv in want.items():
        assert _same(got[rid]["advantage"], adv), (rid, got[rid]["advantage"], adv)
    for pid, group in TABLE.items():
        for rid, ly in group.items():
            r = got[rid]
            assert _same(r["reward"], NAN if ly is None else ly), rid
            assert (r["prompt_id"], r["iteration"], r["n_components"], r["n_failed"]) == (pid, 3, 1, int(ly is None))


def test_the_config_switch_reaches_the_advantages():
    """aggregate reads algorithm.scale_advantage_std: off by default (Dr. GRPO centres only), on when set."""
    scores, rollouts = _tables()
    base = {
        "data": {"path": "x.jsonl"},
        "policy": {"model": "tiny:policy"},
        "evaluators": [{"name": "e", "model": "tiny:evaluator"}],
        "questions": [{"id": "k", "text": "Good?"}],
        "scoring": {"logp_floor": FLOOR},
    }
    for algorithm, want in (({}, CENTRED), ({"scale_advantage_std": True}, SCALED)):
        cfg = validate_config({**base, "algorithm": algorithm})
        table = rewards_for(cfg, scores, rollouts)
        got = _by_id(table)
        assert all(_same(got[rid]["advantage"], a) for rid, a in want.items()), algorithm
        rewards, metrics = rewards_and_metrics(cfg, scores, rollouts)
        assert metrics == {}  # no label reward configured: nothing mixed in
        assert_frame_equal(rewards, table)


def test_weights_and_floor_enter_the_reward_exactly():
    """Two evaluators x two questions: r = sum v_j w_k max(logp, floor), with a negative weight."""
    rollouts = pl.DataFrame({"rollout_id": ["a", "b"], "prompt_id": ["p", "p"], "iteration": [0, 0]})
    rows = [
        ("a", "e1", "x", -1.0),
        ("a", "e1", "y", -2.0),
        ("a", "e2", "x", -0.5),
        ("a", "e2", "y", -40.0),
        ("b", "e1", "x", -3.0),
        ("b", "e1", "y", -0.25),
        ("b", "e2", "x", -1.5),
        ("b", "e2", "y", -1.0),
    ]
    scores = pl.DataFrame(
        {
            "rollout_id": [r[0] for r in rows],
            "evaluator": [r[1] for r in rows],
            "question_id": [r[2] for r in rows],
            "logp_yes": [r[3] for r in rows],
            "logp_no": [-1.0] * 8,
            "p_yes": [0.5] * 8,
            "status": ["ok"] * 8,
        }
    )
    out = _by_id(
        compute_rewards(scores, rollouts, {"e1": 1.0, "e2": 0.5}, {"x": 2.0, "y": -1.0}, form="logp", floor=FLOOR)
    )
    a = 1.0 * (2.0 * -1.0 + -1.0 * -2.0) + 0.5 * (2.0 * -0.5 + -1.0 * FLOOR)  # -40 is floored at -20
    b = 1.0 * (2.0 * -3.0 + -1.0 * -0.25) + 0.5 * (2.0 * -1.5 + -1.0 * -1.0)
    assert (out["a"]["reward"], out["b"]["reward"]) == (a, b)
    assert (out["a"]["advantage"], out["b"]["advantage"]) == ((a - b) / 2, (b - a) / 2)
    assert out["a"]["n_components"] == 4 and out["a"]["n_failed"] == 0


def test_a_judgement_of_an_unknown_evaluator_or_question_is_ignored_and_a_missing_one_fails():
    scores, rollouts = _tables({"p": {"a": -1.0, "b": -3.0}})
    stray = scores.with_columns(evaluator=pl.lit("other"), logp_yes=pl.lit(-100.0))
    out = _by_id(
        compute_rewards(pl.concat([scores, stray]), rollouts, {"e": 1.0}, {"k": 1.0}, form="logp", floor=FLOOR)
    )
    assert (out["a"]["reward"], out["b"]["reward"]) == (-1.0, -3.0)
    two = _by_id(compute_rewards(scores, rollouts, {"e": 1.0}, {"k": 1.0, "k2": 1.0}, form="logp", floor=FLOOR))
    assert all(math.isnan(two[r]["reward"]) and two[r]["n_failed"] == 1 and two[r]["n_components"] == 2 for r in "ab")


def test_a_failed_judgement_at_weight_zero_voids_no_reward():
    """A watched question (weight 0) whose judgement fails: the reward is the weighted ones' sum, not NaN; a
    failure of a weighted one still voids it. Evolve scores each question's paraphrase this way."""
    scores, rollouts = _tables({"p": {"a": -1.0, "b": -3.0}})
    watched = scores.with_columns(question_id=pl.lit("w"), status=pl.lit("context_overflow"), logp_yes=None)
    both = pl.concat([scores, watched])
    out = _by_id(compute_rewards(both, rollouts, {"e": 1.0}, {"k": 1.0, "w": 0.0}, form="logp", floor=FLOOR))
    assert (out["a"]["reward"], out["b"]["reward"]) == (-1.0, -3.0)
    assert (out["a"]["advantage"], out["a"]["n_components"], out["a"]["n_failed"]) == (1.0, 1, 0)
    flipped = _by_id(compute_rewards(both, rollouts, {"e": 1.0}, {"k": 0.0, "w": 1.0}, form="logp", floor=FLOOR))
    assert all(math.isnan(flipped[r]["reward"]) and flipped[r]["n_failed"] == 1 for r in "ab")
    nothing = _by_id(compute_rewards(both, rollouts, {"e": 0.0}, {"k": 1.0, "w": 1.0}, form="logp", floor=FLOOR))
    assert all(nothing[r]["reward"] is None and nothing[r]["n_components"] == 0 for r in "ab")  # no reward, not 0


def test_reward_forms_and_floors_exactly():
    """f(p) per form at values where the floor binds and where it does not."""
    rollouts = pl.DataFrame({"rollout_id": ["a", "b"], "prompt_id": ["p", "q"], "iteration": [0, 0]})
    scores = pl.DataFrame(
        {
            "rollout_id": ["a", "b"],
            "evaluator": ["e", "e"],
            "question_id": ["k", "k"],
            "logp_yes": [math.log(0.25), -30.0],
            "logp_no": [0.0, 0.0],
            "p_yes": [0.5, math.exp(-30.0)],
            "status": ["ok", "ok"],
        }
    )
    want = {
        "logp": (math.log(0.25), FLOOR),  # -30 floored
        "norm_logp": (math.log(0.5), FLOOR),  # log of the normalised p_yes, floored
        "p": (math.exp(math.log(0.25)), math.exp(-30.0)),  # raw P(yes): no floor
    }
    for form, (ra, rb) in want.items():
        out = _by_id(compute_rewards(scores, rollouts, {"e": 1.0}, {"k": 1.0}, form=form, floor=FLOOR))
        assert (out["a"]["reward"], out["b"]["reward"]) == pytest.approx((ra, rb), rel=1e-12, abs=0), form
    at_floor = scores.with_columns(logp_yes=pl.lit(FLOOR), p_yes=pl.lit(math.exp(FLOOR)))
    out = _by_id(compute_rewards(at_floor, rollouts, {"e": 1.0}, {"k": 1.0}, form="logp", floor=FLOOR))
    assert out["a"]["reward"] == FLOOR


def test_with_advantages_keeps_other_columns():
    df = pl.DataFrame(
        {"rollout_id": ["a", "b", "c"], "prompt_id": ["p", "p", "p"], "reward": [1.0, 3.0, NAN], "x": [7, 8, 9]}
    )
    out = with_advantages(df)
    assert out["x"].to_list() == [7, 8, 9] and out["advantage"].to_list()[:2] == [-1.0, 1.0]
    assert math.isnan(out["advantage"][2])
    assert with_advantages(df, scale_std=True)["advantage"].to_list()[:2] == [-1.0 / (1.0 + EPS), 1.0 / (1.0 + EPS)]


def test_three_weight_pairs_and_a_rollout_nobody_judged():
    """Three (evaluator, question) pairs: a weights table as square as its schema (polars must not read
    its rows as columns); a rollout with no scores at all has every component failed, not zero."""
    rollouts = pl.DataFrame({"rollout_id": ["a", "b", "z"], "prompt_id": ["p", "p", "p"], "iteration": [0, 0, 0]})
    rows = [
        (rid, q, ly)
        for rid, base in (("a", -1.0), ("b", -2.0))
        for q, ly in (("x", base), ("y", base * 2), ("w", base * 4))
    ]
    scores = pl.DataFrame(
        {
            "rollout_id": [r[0] for r in rows],
            "evaluator": ["e"] * 6,
            "question_id": [r[1] for r in rows],
            "logp_yes": [r[2] for r in rows],
            "logp_no": [-1.0] * 6,
            "p_yes": [0.5] * 6,
            "status": ["ok"] * 6,
        }
    )
    out = _by_id(
        compute_rewards(scores, rollouts, {"e": 1.0}, {"x": 1.0, "y": 0.5, "w": 0.25}, form="logp", floor=FLOOR)
    )
    assert (out["a"]["reward"], out["b"]["reward"]) == (-3.0, -6.0)
    assert (out["a"]["advantage"], out["b"]["advantage"]) == (1.5, -1.5)
    assert math.isnan(out["z"]["reward"]) and math.isnan(out["z"]["advantage"])
    assert (out["z"]["n_components"], out["z"]["n_failed"]) == (3, 3)
