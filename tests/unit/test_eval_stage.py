"""The eval stage's numbers on a hand-checked case: which completions are correct, and the accuracy."""

from __future__ import annotations

import polars as pl
import pytest

from rlme_pipeline.algorithm.sampling import draw
from rlme_pipeline.config import ConfigError, load_config, validate_config
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.stages.eval import evaluate, sampling
from rlme_pipeline.storage.store import Store
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


def test_temperature_zero_draws_the_most_likely_token_whatever_the_uniform():
    import torch

    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 2.9, 0.0]])
    for u in (0.0, 0.5, 0.999):
        ids, logp = draw(logits, torch.full((2,), u, dtype=torch.float64), temperature=0.0, top_p=1.0)
        assert ids.tolist() == [1, 0]
        assert logp.tolist() == pytest.approx(torch.log_softmax(logits, -1)[[0, 1], [1, 0]].tolist())


@pytest.mark.parametrize(
    "section, message",
    [
        ({"every": 2}, "eval: give eval.path"),
        ({"every": 2, "split": "train"}, "eval.split: 'train' is the split training reads"),
        ({"every": 2, "split": "test", "judges": False}, None),  # the demo has labels: accuracy alone is fine
        ({"every": 0}, None),  # off: nothing to check
    ],
)
def test_eval_config_names_what_is_missing(section, message):
    d = load_config(DEMO).model_dump(mode="json")
    d["eval"] = section
    if message is None:
        validate_config(d)
        return
    with pytest.raises(ConfigError, match=message):
        validate_config(d)


def test_a_missing_held_out_file_fails_in_preflight_naming_eval(tmp_path):
    cfg = load_config(DEMO)
    d = cfg.model_dump(mode="json")
    d["eval"] = {"every": 1, "path": str(tmp_path / "nope.jsonl")}
    bad = validate_config(d)
    bad._base_dir = cfg._base_dir
    with pytest.raises(ConfigError, match=r"^eval\.path: .*nope\.jsonl.* is not a file"):
        preflight(bad, Store(str(tmp_path / "runs")))
