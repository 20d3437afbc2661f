"""One optimizer step of the update stage moves the policy the way the advantages say: the log-prob of
the positive-advantage completion rises, the negative one's falls. A flipped sign anywhere between the
rewards table and the optimizer (advantage, loss, weights) fails here in seconds, not only in the slow
learning test. Real pieces throughout: the tiny policy, the pure update stage on real rollouts and rewards
tables, AdamW. And the stage's progress bar counts its optimizer steps to the end (issue 15: "an update
bar at 0/1")."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlme_pipeline.algorithm.logprobs import completion_logprobs
from rlme_pipeline.config import validate_config
from rlme_pipeline.models.loading import Loaded, load_tokenizer
from rlme_pipeline.stages.update import update

COMPLETIONS = {"good": " The answer is 5.", "bad": " blah blah blah no"}


def _logps(model, tok, prompt: list[int], completions: dict[str, list[int]]) -> dict[str, float]:
    """Summed log-prob of each completion after the prompt (temperature 1)."""
    with torch.no_grad():
        per_token = completion_logprobs(
            model.eval(),
            [(prompt, c) for c in completions.values()],
            pad_id=tok.pad_token_id,
            temperature=1.0,
            chunk_tokens=256,
        )
    out, at = {}, 0
    for name, c in completions.items():
        out[name] = per_token[at : at + len(c)].sum().item()
        at += len(c)
    return out


def _iteration_zero(
    tok, model, prompt: list[int], completions: dict[str, list[int]], advantages: dict[str, float]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rollouts, rewards): the generate and aggregate outputs of iteration 0, as their stages make them:
    on-policy behaviour log-probs (ratio 1) and the given advantages."""
    with torch.no_grad():
        behaviour = [
            completion_logprobs(
                model, [(prompt, c)], pad_id=tok.pad_token_id, temperature=1.0, chunk_tokens=256
            ).tolist()
            for c in completions.values()
        ]
    names = list(completions)
    rollouts = pl.DataFrame(
        {
            "run_id": ["dir"] * 2,
            "iteration": [0, 0],
            "rollout_id": names,
            "prompt_id": ["p", "p"],
            "sample_index": [0, 1],
            "prompt": ["What is 2+3?"] * 2,
            "completion": [COMPLETIONS[n] for n in names],
            "prompt_token_ids": [prompt, prompt],
            "completion_token_ids": [completions[n] for n in names],
            "behavior_logprobs": behaviour,
            "finish_reason": ["length"] * 2,
            "label": [None, None],
            "policy_version": ["v0"] * 2,
        }
    )
    rewards = pl.DataFrame(
        {
            "rollout_id": names,
            "prompt_id": ["p", "p"],
            "iteration": [0, 0],
            "reward": [advantages[n] for n in names],
            "advantage": [advantages[n] for n in names],
            "n_components": [1, 1],
            "n_failed": [0, 0],
        }
    )
    return rollouts, rewards


def _config(tmp_path, policy: str, **sections):
    """A one-question config around the tiny policy; `sections` (algorithm, optimizer) are what a test varies."""
    return validate_config(
        {
            "data": {"path": "x.jsonl"},
            "policy": {"model": policy},
            "evaluators": [{"name": "e", "model": "tiny:evaluator"}],
            "questions": [{"id": "k", "text": "Good?"}],
            "run": {"storage": str(tmp_path / "runs"), "id": "dir"},
            "generation": {"temperature": 1.0, "max_new_tokens": 8},
            **sections,
        }
    )


@pytest.mark.parametrize("loss", ["cispo", "grpo", "dr_grpo"])
def test_one_step_raises_the_positive_and_lowers_the_negative_completion(tmp_path, tiny_models, loss):
    path = str(tiny_models["policy"])
    cfg = _config(
        tmp_path, path, algorithm={"loss": loss}, optimizer={"lr": 1e-3, "micro_batch_size": 1, "grad_accumulation": 2}
    )
    tok = load_tokenizer(path)
    before_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tok("Question: What is 2+3?\nAnswer:")["input_ids"]
    completions = {n: tok(t, add_special_tokens=False)["input_ids"][:8] for n, t in COMPLETIONS.items()}
    rollouts, rewards = _iteration_zero(tok, before_model, prompt, completions, {"good": 1.0, "bad": -1.0})

    # a second copy of the same weights, trained in place by the stage; before_model stays untouched
    lm = Loaded(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok, "v0", path)
    opt, state, metrics = update(cfg, 0, rollouts, rewards, lm, None, None)
    assert metrics["optimizer_steps"] == 1 and metrics["trained_rollouts"] == 2
    assert (state["iteration"], state["optimizer_steps"]) == (0, 1) and isinstance(opt, torch.optim.AdamW)

    before, after = _logps(before_model, tok, prompt, completions), _logps(lm.model, tok, prompt, completions)
    assert after["good"] > before["good"], (before, after)
    assert after["bad"] < before["bad"], (before, after)


def test_the_update_bar_counts_optimizer_steps_to_its_total(tmp_path, tiny_models, capsys):
    """2 rollouts x 3 epochs, one per step: 6 optimizer steps, and the bar (piped: its final line) says 6/6."""
    path = str(tiny_models["policy"])
    cfg = _config(tmp_path, path, optimizer={"micro_batch_size": 1, "grad_accumulation": 1, "epochs": 3})
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tok("Question: What is 2+3?\nAnswer:")["input_ids"]
    completions = {n: tok(t, add_special_tokens=False)["input_ids"][:8] for n, t in COMPLETIONS.items()}
    rollouts, rewards = _iteration_zero(tok, model, prompt, completions, {"good": 1.0, "bad": -1.0})
    capsys.readouterr()
    _, _, metrics = update(cfg, 4, rollouts, rewards, Loaded(model, tok, "v0", path), None, None)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("update iter 4: optimizer steps")]
    assert metrics["optimizer_steps"] == 6 and " 6/6 " in line, line


def test_the_lr_schedule_is_hand_checked_and_reaches_the_optimizer(tmp_path, tiny_models):
    """Cosine over iterations, then held: 1e-3 at 0, 5.5e-4 half way (0.1 + 0.9 * 0.5), 1e-4 at and past
    the end. The stage steps with that lr whatever the optimizer held before: at a final ratio of 0 the
    weights do not move."""
    path = str(tiny_models["policy"])
    o = _config(tmp_path, path, optimizer={"lr": 1e-3, "lr_decay_iterations": 4}).optimizer
    assert [round(o.lr_at(i), 12) for i in (0, 2, 4, 9)] == [1e-3, 5.5e-4, 1e-4, 1e-4]
    assert _config(tmp_path, path, optimizer={"lr": 1e-3}).optimizer.lr_at(7) == 1e-3  # constant by default

    cfg = _config(tmp_path, path, optimizer={"lr": 1e-2, "lr_decay_iterations": 1, "lr_final_ratio": 0.0})
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tok("Question: What is 2+3?\nAnswer:")["input_ids"]
    completions = {n: tok(t, add_special_tokens=False)["input_ids"][:8] for n, t in COMPLETIONS.items()}
    rollouts, rewards = _iteration_zero(tok, model, prompt, completions, {"good": 1.0, "bad": -1.0})
    lm = Loaded(model, tok, "v0", path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm.optimizer, _, _ = update(cfg, 0, rollouts, rewards, lm, None, None)  # lr 1e-2: the weights move
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    opt, _, _ = update(cfg, 1, rollouts, rewards, lm, None, None)  # lr 0, through the kept optimizer
    assert opt.param_groups[0]["lr"] == 0.0
    assert all(torch.equal(moved[k], v) for k, v in model.state_dict().items())
