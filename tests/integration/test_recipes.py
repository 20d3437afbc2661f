"""The recipes in configs/ (docs/recipes.md): the CPU one trains for real, the GPU one is a valid config.

The CPU recipe runs one iteration through `rlme train` (the CLI, its Prefect flow, preflight, the GGUF
import found in the session's cache) with the real SmolLM2-135M-Instruct as policy and judge, exactly as the
file says, only its storage and iteration count given on the command line. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from tests.conftest import ROOT

CPU_RECIPE = ROOT / "configs" / "smollm2-cpu.yaml"
GPU_RECIPE = ROOT / "configs" / "gsm8k-qwen2.5-0.5b.yaml"


def _recipe_for(gguf: Path, tmp_path: Path) -> Path:
    """The CPU recipe itself, or, where RLME_REAL_MODELS put the GGUF file elsewhere than the recipe's
    relative reference, the same recipe pointed at that file."""
    d = yaml.safe_load(CPU_RECIPE.read_text())
    ref = d["policy"]["model"]
    assert [ev["model"] for ev in d["evaluators"]] == [ref], "the recipe's one judge is the policy's model file"
    if (CPU_RECIPE.parent / ref.removeprefix("gguf:")).resolve() == gguf.resolve():
        return CPU_RECIPE
    d["policy"]["model"] = d["evaluators"][0]["model"] = f"gguf:{gguf}"
    d["data"]["path"] = str((CPU_RECIPE.parent / d["data"]["path"]).resolve())
    path = tmp_path / "smollm2-cpu.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _judge_chat(tok, cfg, prompt: str, completion: str, question: str) -> str:
    """The judge's text as its own chat template renders it: one user turn, the assistant's turn opened."""
    sc = cfg.scoring
    content = sc.template.format(prompt=prompt, completion=completion) + sc.question_template.format(question=question)
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def _judge_logp_yes(model, tok, cfg, prompt: str, completion: str, question: str) -> float:
    """log P(yes) after the judge's chat text, by a plain forward pass of the whole sequence: what the score
    stage's shared-prefix, packed-question computation must agree with. Each answer's id is the token it
    becomes right after the assistant header."""
    chat = _judge_chat(tok, cfg, prompt, completion, question)
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    yes = {tok(chat + a, add_special_tokens=False)["input_ids"][len(ids)] for a in (" Yes", "Yes")}
    return float(torch.logsumexp(logp[sorted(yes)], 0))


@pytest.mark.slow
def test_cpu_recipe_trains_one_iteration_with_the_real_model_through_rlme_train(smollm2_gguf, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlme_pipeline.config import load_config
    from rlme_pipeline.models.export import export
    from rlme_pipeline.storage.run import REWARDS_FILE, ROLLOUTS_FILE, SCORES_FILE, Run
    from rlme_pipeline.storage.schemas import OK

    config = _recipe_for(smollm2_gguf, tmp_path)
    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "rlme_flows.cli", "train", str(config), "--iterations", "1", "--storage", str(storage)]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "1 of 1 iterations committed" in p.stdout, p.stdout[-2000:]

    cfg = load_config(config)
    run = Run.from_url(str(storage / cfg.run.id))
    assert run.committed() == [0]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()

    # rollouts: the recipe's prompts through the template and SmolLM2's own chat template, sampled text back
    roll = run.read_table(0, ROLLOUTS_FILE).sort("prompt_id", "sample_index")
    g = cfg.generation
    assert roll.height == cfg.data.prompts_per_iteration * g.group_size
    for r in roll.iter_rows(named=True):
        assert r["prompt"].startswith("What is ") and r["prompt"].endswith("where N is the number."), r["prompt"]
        chat = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)  # fmt: skip
        assert tok.decode(r["prompt_token_ids"]) == chat and chat.startswith("<|im_start|>system\n")
        assert 1 <= len(r["completion_token_ids"]) <= g.max_new_tokens
        assert r["completion"] == tok.decode(r["completion_token_ids"], skip_special_tokens=True)
        assert all(math.isfinite(x) and x <= 0 for x in r["behavior_logprobs"])
    # an instruct model answering, not noise: most samples stop by themselves and talk about the answer
    assert (roll["finish_reason"] == "stop").mean() >= 0.5
    assert roll["completion"].str.to_lowercase().str.contains("answer").sum() >= roll.height // 4, roll["completion"]

    # scores: every rollout x question judged, each a real P(yes) of the judge on its chat-templated text
    scores = run.read_table(0, SCORES_FILE)
    assert scores.height == roll.height * len(cfg.questions) and (scores["status"] == OK).all()
    assert scores.select(pl.col("logp_yes").is_finite().all() & (pl.col("logp_yes") < 0).all()).item()
    assert scores.select(pl.col("p_yes").is_between(0, 1, closed="none").all()).item()
    q = cfg.questions[0]
    judge_text = _judge_chat(tok, cfg, "P", "C", q.text)
    assert judge_text.startswith("<|im_start|>system\n") and judge_text.endswith("Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    assert "Question: P\nResponse: C\n\nIs the answer correct?" in judge_text, (
        "the judge's prompt is SmolLM2's own chat template"
    )
    r0 = roll.row(0, named=True)
    stored = scores.filter((pl.col("rollout_id") == r0["rollout_id"]) & (pl.col("question_id") == q.id))["logp_yes"].item()  # fmt: skip
    assert stored == pytest.approx(_judge_logp_yes(base, tok, cfg, r0["prompt"], r0["completion"], q.text), abs=1e-4)

    # rewards: finite, group-centred
    rewards = run.read_table(0, REWARDS_FILE)
    assert rewards.height == roll.height and rewards["reward"].is_finite().all() and (rewards["n_failed"] == 0).all()
    sums = rewards.group_by("prompt_id").agg(pl.col("advantage").sum().abs())["advantage"]
    assert (sums < 1e-4).all() and rewards["advantage"].abs().max() > 0

    # the checkpoint: a LoRA adapter on SmolLM2 that loads, merged, as an ordinary model, and moved the policy
    m = run.manifest(0)
    assert m.metrics["failed_share"] == 0 and m.metrics["optimizer_steps"] == 1 and m.metrics["grad_norm"] > 0
    out = export(run, tmp_path / "exported", merge_lora=True).out
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([roll["prompt_token_ids"][0].to_list()])
    with torch.no_grad():
        after, before = trained(ids).logits, base(ids).logits
    assert torch.isfinite(after).all() and 0 < (after - before).abs().max() < 5


def test_gpu_recipe_is_a_valid_config_for_gsm8k_on_one_gpu():
    """configs/gsm8k-qwen2.5-0.5b.yaml validates (no model or data is loaded: the hub is not reachable here)."""
    from rlme_pipeline.config import load_config

    cfg = load_config(GPU_RECIPE)
    d = cfg.data
    assert (d.path, d.config, d.split, d.prompt_column, d.label_column) == ("openai/gsm8k", "main", "train", "question", "answer")  # fmt: skip
    assert "####" in d.prompt_template and "{question}" in d.prompt_template
    assert cfg.answer_format() == "gsm8k" and cfg.label_reward is None  # RLME: training reads no label
    assert cfg.policy.model == "Qwen/Qwen2.5-0.5B-Instruct" and (cfg.policy.dtype, cfg.policy.device) == ("bfloat16", "cuda")  # fmt: skip
    assert [(e.model, e.dtype, e.device) for e in cfg.evaluators] == [("Qwen/Qwen2.5-7B-Instruct", "bfloat16", "cuda")]
    o, g = cfg.optimizer, cfg.generation
    rollouts = d.prompts_per_iteration * g.group_size
    assert rollouts % (o.micro_batch_size * o.grad_accumulation) == 0  # whole optimizer steps
    assert cfg.eval.every > 0 and cfg.eval.split == "test"
    # the judge reads its own chat template (Qwen2.5's ChatML) and P(yes) as the assistant's first token
    # (rlme wraps the templates in it: they hold no markers of their own, or the judge would read them twice)
    assert cfg.scoring.chat_template == "on" and "<|im_" not in cfg.scoring.template + cfg.scoring.question_template
