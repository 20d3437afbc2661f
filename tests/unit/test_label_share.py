"""RLME-nGT: exact-match rewards on a share 0 < s < 1 of the rollouts, judge rewards on the rest.

The rollout ids are chosen so that the selection at share 0.6 is known by hand: u(id) is the first 15
hex digits of sha256("label-reward/" + id) over 16**15, recomputed here from hashlib and pinned, since a
resumed run must pick exactly the rollouts the interrupted one picked.
"""

from __future__ import annotations

import hashlib
import math

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rlme_pipeline.algorithm.label_reward import mix_label_rewards, selected, values
from rlme_pipeline.algorithm.rewards import compute_rewards
from rlme_pipeline.config import LabelRewardConfig, validate_config
from rlme_pipeline.stages.aggregate import rewards_and_metrics

FLOOR = -20.0
SHARE = 0.6
U = {"r2": 0.5879, "r3": 0.5552, "r4": 0.7083, "r5": 0.9343, "r6": 0.3568, "r7": 0.8780, "r8": 0.0360, "r9": 0.0785}
#        id    prompt  completion            label  judge log P(yes) (None: failed)
ROWS = [
    ("r2", "p", " The answer is 5.", "5", -1.0),  # selected, right       -> 0
    ("r4", "p", " The answer is 5.", "5", -1.0),  # not selected          -> judge
    ("r6", "p", " The answer is 4.", "5", None),  # selected, wrong; its failed judgement is replaced
    ("r5", "p", " The answer is 5.", "5", None),  # not selected, failed  -> NaN, masked
    ("r3", "q", " I think 8.", "7", -0.5),  # selected, wrong       -> floor
    ("r8", "q", " The answer is 7.", None, -1.5),  # selected, no label    -> judge
    ("r9", "q", "The answer is 7", "7", -2.5),  # selected, right       -> 0
    ("r7", "q", " The answer is 7.", "7", -3.5),
]  # not selected          -> judge


def _tables():
    rollouts = pl.DataFrame(
        {
            "rollout_id": [r[0] for r in ROWS],
            "prompt_id": [r[1] for r in ROWS],
            "iteration": [1] * 8,
            "completion": [r[2] for r in ROWS],
            "label": [r[3] for r in ROWS],
        }
    )
    scores = pl.DataFrame(
        {
            "rollout_id": [r[0] for r in ROWS],
            "evaluator": ["e"] * 8,
            "question_id": ["k"] * 8,
            "logp_yes": [r[4] for r in ROWS],
            "logp_no": [None if r[4] is None else -1.0 for r in ROWS],
            "p_yes": [None if r[4] is None else 0.5 for r in ROWS],
            "status": ["ok" if r[4] is not None else "nonfinite" for r in ROWS],
        },
        schema_overrides={"logp_yes": pl.Float64, "logp_no": pl.Float64, "p_yes": pl.Float64},
    )
    return scores, rollouts


def test_the_selection_is_the_pinned_hash():
    for rid, u in U.items():
        h = int(hashlib.sha256(f"label-reward/{rid}".encode()).hexdigest()[:15], 16) / 16**15
        assert h == pytest.approx(u, abs=1e-4)
        assert selected(rid, SHARE) == (u < SHARE) == (rid in ("r2", "r3", "r6", "r8", "r9"))
    assert selected("r3", 0.5553) and not selected("r3", 0.5551)  # u < share, not <=


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_mixing_at_a_share_between_zero_and_one(weight):
    scores, rollouts = _tables()
    judged = compute_rewards(scores, rollouts, {"e": 1.0}, {"k": 1.0}, form="logp", floor=FLOOR)
    out, metrics = mix_label_rewards(
        judged, rollouts, LabelRewardConfig(share=SHARE, weight=weight), fmt="answer_is", form="logp", floor=FLOOR
    )
    bad = weight * FLOOR
    reward = {"r2": 0.0, "r4": -1.0, "r6": bad, "r5": math.nan, "r3": bad, "r8": -1.5, "r9": 0.0, "r7": -3.5}
    p_mean, q_mean = (0.0 - 1.0 + bad) / 3, (bad - 1.5 + 0.0 - 3.5) / 4
    got = {r["rollout_id"]: r for r in out.iter_rows(named=True)}
    assert out.columns == judged.columns and out["rollout_id"].to_list() == [r[0] for r in ROWS]
    for rid, want in reward.items():
        r = got[rid]
        if math.isnan(want):
            assert math.isnan(r["reward"]) and math.isnan(r["advantage"]) and r["n_failed"] == 1
            continue
        assert r["reward"] == want, rid
        assert r["advantage"] == pytest.approx(want - (p_mean if r["prompt_id"] == "p" else q_mean), abs=1e-12), rid
    assert (got["r6"]["n_components"], got["r6"]["n_failed"]) == (1, 0)  # the rule replaced a failed judgement
    assert metrics == {"label_rewarded_share": 4 / 8}  # r2, r3, r6, r9: selected and labelled


def test_aggregate_mixes_by_the_configured_share_and_not_at_zero():
    scores, rollouts = _tables()
    base = {
        "data": {"path": "x.jsonl", "label_column": "answer"},
        "policy": {"model": "tiny:policy"},
        "evaluators": [{"name": "e", "model": "tiny:evaluator"}],
        "questions": [{"id": "k", "text": "Good?"}],
        "scoring": {"logp_floor": FLOOR},
    }
    judged = compute_rewards(scores, rollouts, {"e": 1.0}, {"k": 1.0}, form="logp", floor=FLOOR)
    cfg = validate_config({**base, "label_reward": {"share": SHARE}})
    mixed, metrics = rewards_and_metrics(cfg, scores, rollouts)
    want, _ = mix_label_rewards(
        judged, rollouts, LabelRewardConfig(share=SHARE), fmt="answer_is", form="logp", floor=FLOOR
    )
    assert_frame_equal(mixed, want)
    assert metrics["label_rewarded_share"] == 0.5
    off, m0 = rewards_and_metrics(validate_config({**base, "label_reward": {"share": 0.0}}), scores, rollouts)
    assert_frame_equal(off, judged) and m0 == {}


def test_label_values_per_form():
    assert values("logp", FLOOR) == (0.0, FLOOR) and values("norm_logp", FLOOR) == (0.0, FLOOR)
    assert values("p", FLOOR) == (1.0, 0.0)


def test_mixing_honours_the_answer_format_std_scaling_and_component_counts():
    rollouts = pl.DataFrame(
        {
            "rollout_id": ["x", "y", "z"],
            "prompt_id": ["p"] * 3,
            "iteration": [0] * 3,
            "completion": [" The answer is 3. \\boxed{5}", " \\boxed{4}", " The answer is 5."],
            "label": ["5", "5", None],
        }
    )
    scores = pl.DataFrame(
        {
            "rollout_id": [r for r in "xyz" for _ in range(2)],
            "evaluator": ["e"] * 6,
            "question_id": ["k", "k2"] * 3,
            "logp_yes": [-1.0, -1.0, -1.0, -1.0, -5.0, -5.0],
            "logp_no": [-1.0] * 6,
            "p_yes": [0.5] * 6,
            "status": ["ok"] * 6,
        }
    )
    judged = compute_rewards(
        scores, rollouts, {"e": 1.0}, {"k": 1.0, "k2": 1.0}, form="logp", floor=FLOOR, scale_std=True
    )
    lc = LabelRewardConfig(share=1.0)
    out, metrics = mix_label_rewards(judged, rollouts, lc, fmt="boxed", form="logp", floor=FLOOR, scale_std=True)
    got = {r["rollout_id"]: r for r in out.iter_rows(named=True)}
    rewards = {"x": 0.0, "y": FLOOR, "z": -10.0}  # x is right by its box, though "The answer is 3" comes first
    mean = sum(rewards.values()) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in rewards.values()) / 3)
    for rid, want in rewards.items():
        assert got[rid]["reward"] == want, rid
        assert got[rid]["advantage"] == pytest.approx((want - mean) / (std + 1e-6), rel=1e-12), rid
    assert [(got[r]["n_components"], got[r]["n_failed"]) for r in "xyz"] == [(1, 0), (1, 0), (2, 0)]
    assert metrics == {"label_rewarded_share": 2 / 3}
    one, m1 = mix_label_rewards(judged.head(1), rollouts.head(1), lc, fmt="boxed", form="logp", floor=FLOOR)
    assert one["reward"].to_list() == [0.0] and m1 == {"label_rewarded_share": 1.0}


def test_a_rollout_exactly_at_the_share_is_not_selected():
    for rid in U:
        u = int(hashlib.sha256(f"label-reward/{rid}".encode()).hexdigest()[:15], 16) / 16**15
        assert not selected(rid, u) and selected(rid, math.nextafter(u, 1.0))  # u < share, strictly


def test_aggregate_reads_answers_with_the_run_answer_format():
    """The label reward reads `answers.format` (GSM8K's ####), not label_reward.extractor's default."""
    rollouts = pl.DataFrame(
        {
            "rollout_id": ["a", "b", "c"],
            "prompt_id": ["p"] * 3,
            "iteration": [0] * 3,
            "completion": ["So 48 + 24 = 72.\n#### 72", "The answer is 72.", "#### 71"],
            "label": ["48 + 24 = <<48+24=72>>72\n#### 72"] * 3,
        }
    )
    scores = pl.DataFrame(
        {
            "rollout_id": ["a", "b", "c"],
            "evaluator": ["e"] * 3,
            "question_id": ["k"] * 3,
            "logp_yes": [-1.0] * 3,
            "logp_no": [-1.0] * 3,
            "p_yes": [0.5] * 3,
            "status": ["ok"] * 3,
        }
    )
    base = {
        "data": {"path": "x.jsonl", "label_column": "answer"},
        "policy": {"model": "tiny:policy"},
        "evaluators": [{"name": "e", "model": "tiny:evaluator"}],
        "questions": [{"id": "k", "text": "Good?"}],
        "scoring": {"logp_floor": FLOOR},
        "label_reward": {"share": 1.0},
    }
    gsm8k, _ = rewards_and_metrics(validate_config({**base, "answers": {"format": "gsm8k"}}), scores, rollouts)
    legacy, _ = rewards_and_metrics(validate_config(base), scores, rollouts)  # answer_is, as before answers
    assert gsm8k["reward"].to_list() == [0.0, 0.0, FLOOR]
    assert legacy["reward"].to_list() == [FLOOR, 0.0, FLOOR]  # answer_is does not read ####
