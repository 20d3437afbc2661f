"""The eval stage's numbers on a hand-checked case: which completions are correct, and the accuracy."""

from __future__ import annotations

import polars as pl
import pytest

from rlme_pipeline.config import load_config
from rlme_pipeline.stages.eval import evaluate, sampling
from tests.conftest import DEMO


def _rollouts(rows: list[tuple[str, str, str | None]]) -> pl.DataFrame:
    """generate's columns, for (prompt id, completion, label) rows."""
    return pl.DataFrame(
        [
            {
                "run_id": "r",
                "iteration": 2,
                "rollout_id": f"id-{pid}",
                "prompt_id": pid,
                "sample_index": 0,
                "prompt": f"prompt {pid}",
                "completion": text,
                "prompt_token_ids": [1, 2],
                "completion_token_ids": list(range(len(text.split()))),
                "behavior_logprobs": [0.0] * len(text.split()),
                "finish_reason": "stop",
                "label": label,
                "policy_version": "v",
            }
            for pid, text, label in rows
        ]
    )


def test_accuracy_is_exact_match_over_labelled_prompts_only():
    cfg = load_config(DEMO)
    rollouts = _rollouts(
        [
            ("a", "5 + 1 is 6. The answer is 6.", "6"),  # correct
            ("b", "The answer is 1,000.0", "1000"),  # correct: numbers compare by value
            ("c", "I think it is 7. The answer is 8", "7"),  # wrong: the stated answer is 8
            ("d", "no idea", "3"),  # wrong: no answer stated is not correct
            ("e", "The answer is 4", None),  # unlabelled: left out of the accuracy
        ]
    )
    table, metrics = evaluate(cfg, rollouts, [], backends=None)  # no evaluators: accuracy only
    assert dict(zip(table["prompt_id"], table["correct"])) == {"a": True, "b": True, "c": False, "d": False, "e": None}
    assert table["answer"].to_list() == ["6", "1000", "8", None, "4"]
    assert metrics["eval/accuracy"] == pytest.approx(2 / 4)
    assert metrics["eval/labelled"] == 4 and metrics["eval/prompts"] == 5
    assert "eval/reward_mean" not in metrics  # no judges asked: no reward, not a zero
    assert table["rollout_id"].str.starts_with("eval/").all()  # apart from training rollout ids
    assert table["reward"].is_null().all()


def test_no_labels_means_no_accuracy():
    _, metrics = evaluate(load_config(DEMO), _rollouts([("a", "The answer is 6", None)]), [], backends=None)
    assert "eval/accuracy" not in metrics


def test_greedy_by_default_and_seeded_apart_from_training():
    cfg = load_config(DEMO)
    s = sampling(cfg, 3)
    assert s.samples == 1 and s.temperature == 0 and s.stage == "eval"
    assert s.seed == (cfg.eval.seed, "eval", 3)
    assert s.max_new_tokens == (cfg.eval.max_new_tokens or cfg.generation.max_new_tokens)
