"""Rule-based rewards: answer extraction, the deterministic label share, and the reward mixture."""

from __future__ import annotations

import math

import polars as pl
import pytest

from rlme_pipeline.algorithm.answers import extract_answer, is_correct
from rlme_pipeline.algorithm.label_reward import mix_label_rewards, selected
from rlme_pipeline.algorithm.rewards import compute_rewards
from rlme_pipeline.config import ConfigError, LabelRewardConfig, validate_config

FLOOR = math.log(1e-6)


@pytest.mark.parametrize(
    "text,extractor,want",
    [
        (" The answer is 38.", "answer_is", "38"),
        ("so the answer is -4", "answer_is", "-4"),
        ("The answer is 1,234.", "answer_is", "1234"),  # normalised: numbers compare by value
        ("The answer is 3. No wait, the answer is 5.", "answer_is", "5"),
        ("The answer is correct.", "answer_is", None),
        (r"thus \boxed{42} and \boxed{7}", "boxed", "7"),
        ("no box 12", "boxed", None),
        ("12 apples and 30 pears: 42", "last_number", "42"),
        ("nothing", "last_number", None),
    ],
)
def test_extract_answer(text, extractor, want):
    assert extract_answer(text, extractor) == want


def test_is_correct_compares_numbers_by_value():
    assert is_correct(" The answer is 38.", "38")
    assert is_correct("The answer is 1,234", "1234")
    assert is_correct(r"\boxed{2.50}", "2.5", "boxed")
    assert not is_correct(" The answer is 39.", "38")
    assert not is_correct(" The answer is", "38")
    assert not is_correct(" The answer is 38.", None)
    with pytest.raises(ValueError):
        extract_answer("x", "nope")


def test_selection_is_deterministic_and_close_to_the_share():
    ids = [f"r{i}" for i in range(4000)]
    picked = [selected(i, 0.1) for i in ids]
    assert picked == [selected(i, 0.1) for i in ids]
    assert 0.08 < sum(picked) / len(ids) < 0.12
    assert all(selected(i, 1.0) for i in ids[:10]) and not any(selected(i, 0.0) for i in ids[:100])


def _tables():
    rollouts = pl.DataFrame(
        {
            "rollout_id": ["a", "b", "c", "d"],
            "prompt_id": ["p", "p", "q", "q"],
            "iteration": [0, 0, 0, 0],
            "completion": [" The answer is 5.", " The answer is 6.", " The answer is 7.", "garbage"],
            "label": ["5", "5", None, "8"],
        }
    )
    scores = pl.DataFrame(
        {
            "rollout_id": ["a", "b", "c", "d"],
            "evaluator": ["j"] * 4,
            "question_id": ["correct"] * 4,
            "logp_yes": [-0.5, -0.1, -2.0, -0.2],
            "logp_no": [-1.0] * 4,
            "p_yes": [0.6] * 4,
            "status": ["ok"] * 4,
        }
    )
    return rollouts, scores


def test_rlvr_replaces_every_labelled_reward_and_recentres():
    rollouts, scores = _tables()
    judged = compute_rewards(scores, rollouts, {"j": 1.0}, {"correct": 1.0}, form="logp", floor=FLOOR)
    out, m = mix_label_rewards(
        judged, rollouts, LabelRewardConfig(share=1.0), fmt="answer_is", form="logp", floor=FLOOR
    )
    r = dict(zip(out["rollout_id"], out["reward"]))
    assert r["a"] == 0.0 and r["b"] == FLOOR and r["d"] == FLOOR
    assert r["c"] == -2.0  # no label: the judge's reward stays
    adv = dict(zip(out["rollout_id"], out["advantage"]))
    assert adv["a"] == pytest.approx(-FLOOR / 2) and adv["b"] == pytest.approx(FLOOR / 2)
    assert out.columns == judged.columns and m["label_rewarded_share"] == 0.75
    assert dict(zip(out["rollout_id"], out["n_components"]))["a"] == 1


def test_p_form_uses_one_and_zero_and_weight_scales():
    rollouts, scores = _tables()
    judged = compute_rewards(scores, rollouts, {"j": 1.0}, {"correct": 1.0}, form="p", floor=FLOOR)
    out, _ = mix_label_rewards(
        judged, rollouts, LabelRewardConfig(share=1.0, weight=2.0), fmt="answer_is", form="p", floor=FLOOR
    )
    r = dict(zip(out["rollout_id"], out["reward"]))
    assert (r["a"], r["b"]) == (2.0, 0.0)


def test_label_reward_rescues_a_failed_judgement():
    rollouts, scores = _tables()
    scores = scores.with_columns(
        status=pl.when(pl.col("rollout_id") == "a").then(pl.lit("nonfinite")).otherwise(pl.col("status"))
    )
    judged = compute_rewards(scores, rollouts, {"j": 1.0}, {"correct": 1.0}, form="logp", floor=FLOOR)
    assert math.isnan(judged.filter(pl.col("rollout_id") == "a")["reward"][0])
    out, _ = mix_label_rewards(
        judged, rollouts, LabelRewardConfig(share=1.0), fmt="answer_is", form="logp", floor=FLOOR
    )
    assert out.filter(pl.col("rollout_id") == "a")["reward"][0] == 0.0


BASE = {
    "data": {"path": "x.jsonl", "label_column": "answer"},
    "policy": {"model": "tiny:policy"},
    "questions": [{"id": "correct", "text": "Is the answer correct?"}],
}


def test_config_rules(monkeypatch):
    validate_config({**BASE, "label_reward": {"share": 1.0}})  # RLVR: no evaluators needed
    with pytest.raises(ConfigError, match="evaluators"):
        validate_config({**BASE, "label_reward": {"share": 0.1}})
    with pytest.raises(ConfigError, match="label_column"):
        validate_config({**BASE, "data": {"path": "x.jsonl"}, "label_reward": {"share": 1.0}})
    with_judge = {**BASE, "evaluators": [{"name": "j", "model": "tiny:evaluator"}]}
    # a config without label_reward keeps the hash it had before the field existed: None is not hashed
    import rlme_pipeline.config as config_module

    hashed = []
    real = config_module.sha256_json
    monkeypatch.setattr(config_module, "sha256_json", lambda d: hashed.append(d) or real(d))
    cfg = validate_config(with_judge)
    cfg.hash()
    assert "label_reward" not in hashed[-1]
    a = cfg.hash()
    b = validate_config({**with_judge, "label_reward": {"share": 0.1}}).hash()
    assert a != b
