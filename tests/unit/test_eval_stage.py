"""The eval stage's numbers on a hand-checked case: which completions are correct, and the accuracy."""

from __future__ import annotations

import polars as pl
import pytest

from rlme_pipeline.algorithm.sampling import draw
from rlme_pipeline.config import ConfigError, load_config, validate_config
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.stages.eval import evaluate, samples_sampling, sampling
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


# --- pass@k and maj@k (eval.samples) -----------------------------------------------------------------


def _sampled(rows: list[tuple[str, list[str], str | None]]) -> pl.DataFrame:
    """generate's columns for (prompt id, [one completion, then its k samples], label)."""
    table = _rollouts([(pid, texts[0], label) for pid, texts, label in rows])
    more = [
        r | {"rollout_id": f"id-{r['prompt_id']}-{s}", "sample_index": s, "completion": text}
        for r, (_, texts, _) in zip(table.iter_rows(named=True), rows)
        for s, text in enumerate(texts[1:], start=1)
    ]
    return pl.concat([table, pl.DataFrame(more, schema=table.schema)])


def _with_samples(k: int, **answers):
    d = load_config(DEMO).model_dump(mode="json")
    d["eval"] = {"samples": k}
    if answers:
        d["answers"] = answers
    return validate_config(d)


def test_pass_and_majority_at_k_over_labelled_prompts():
    rollouts = _sampled(
        [
            ("a", ["The answer is 6", "The answer is 6", "The answer is 5", "The answer is 5"], "6"),  # pass, vote 5
            ("b", ["no idea", "The answer is 7", "nothing", "The answer is 7"], "7"),  # pass and vote: 2 of 3
            ("c", ["The answer is 3", "nothing", "no", "none"], "3"),  # no sample answers: neither
            ("d", ["The answer is 1", "The answer is 2", "The answer is 1", "The answer is 9"], "2"),  # tie: 2 first
            ("e", ["The answer is 1", "The answer is 1", "The answer is 2", "The answer is 9"], "2"),  # tie: 1 first
            ("f", ["The answer is 4", "The answer is 4", "The answer is 4", "The answer is 4"], None),  # no label
        ]
    )
    table, m = evaluate(_with_samples(3), rollouts, [], backends=None)
    assert m["eval/accuracy"] == pytest.approx(2 / 5)  # the one completion each: a and c are right
    assert m["eval/prompts"] == 6 and m["eval/labelled"] == 5  # prompts, not rows
    assert m["eval/samples"] == 3
    assert m["eval/pass_at_k"] == pytest.approx(4 / 5)  # a, b, d, e
    assert m["eval/maj_at_k"] == pytest.approx(2 / 5)  # b, d
    assert table.height == 24 and table["sample_index"].to_list()[:4] == [0, 1, 2, 3]
    assert table.filter(pl.col("prompt_id") == "b")["answer"].to_list() == [None, "7", None, "7"]


def test_majority_votes_by_the_run_answer_format():
    """Under gsm8k, "$1,000" and "1000.00" are one vote, and the vote is read against the label's ####."""
    rollouts = _sampled([("a", ["#### 3", "#### $1,000", "#### 7", "#### 1000.00"], "so #### 1000")])
    _, m = evaluate(_with_samples(3, format="gsm8k"), rollouts, [], backends=None)
    assert (m["eval/accuracy"], m["eval/pass_at_k"], m["eval/maj_at_k"]) == (0.0, 1.0, 1.0)
    _, text = evaluate(_with_samples(3, format="answer_is"), rollouts, [], backends=None)
    assert (text["eval/pass_at_k"], text["eval/maj_at_k"]) == (0.0, 0.0)  # answer_is does not read ####


def test_no_samples_no_pass_at_k_and_samples_without_labels_give_k_only():
    _, one = evaluate(load_config(DEMO), _rollouts([("a", "The answer is 6", "6")]), [], backends=None)
    assert not {"eval/pass_at_k", "eval/maj_at_k", "eval/samples"} & set(one)
    _, unlabelled = evaluate(_with_samples(2), _sampled([("a", ["6", "6", "6"], None)]), [], backends=None)
    assert unlabelled["eval/samples"] == 2 and "eval/pass_at_k" not in unlabelled


def test_the_samples_are_sampled_and_seeded_apart():
    cfg = _with_samples(4)
    s = samples_sampling(cfg, 3)
    assert s.samples == 4 and s.temperature == cfg.generation.temperature and s.stage == "eval"
    assert s.seed == (cfg.eval.seed, "eval-samples", 3) != sampling(cfg, 3).seed
    d = cfg.model_dump(mode="json")
    d["eval"]["sample_temperature"] = 0.6
    assert samples_sampling(validate_config(d), 3).temperature == 0.6
    d["eval"]["sample_temperature"] = 0
    with pytest.raises(ConfigError, match=r"eval\.sample_temperature: Input should be greater than 0"):
        validate_config(d)
