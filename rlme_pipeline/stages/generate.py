"""generate: G sampled completions per prompt from the policy that this iteration starts from."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from rlme_pipeline import seeds
from rlme_pipeline.config import Config
from rlme_pipeline.progress import bar
from rlme_pipeline.storage.crash import crash_point


def chat_prompt_ids(tokenizer, prompt: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn: training's (`training`, from cfg.generation) or held-out evaluation's
    (stages/eval.py). Sample s of a prompt gets the seed derive(*seed, prompt id, s)."""

    samples: int  # per prompt
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    batch_size: int
    seed: tuple
    stage: str = "generate"  # names the progress bar ("generate iter 3: samples") and the crash point ("generate:mid")


def training(cfg: Config, iteration: int) -> Sampling:
    g = cfg.generation
    return Sampling(g.group_size, g.max_new_tokens, g.temperature, g.top_p, g.batch_size, (cfg.run.seed, iteration))


def generate(
    cfg: Config,
    run_id: str,
    iteration: int,
    prompts: pl.DataFrame,
    policy_version: str,
    gen,
    tok,
    sampling: Sampling | None = None,
) -> tuple[pl.DataFrame, dict]:
    """(rollouts, metrics): the iteration's prompts sampled with `gen`, the policy whose weights hash is
    `policy_version`; seeds derive from (run seed, iteration, prompt, sample), so a rerun repeats them."""
    rows = _generate(cfg, run_id, iteration, prompts, policy_version, gen, tok, sampling or training(cfg, iteration))
    client_stats = dict(gen.client.stats) if hasattr(gen, "client") else {}
    df = pl.DataFrame(rows).sort("prompt_id", "sample_index")
    lengths = df["completion_token_ids"].list.len()
    metrics = {
        "completion_tokens_mean": float(lengths.mean()),
        "finish_stop_share": float((df["finish_reason"] == "stop").mean()),
    }
    for k in ("retries", "restarts", "failovers"):  # openai backend: what it took to get every sample
        if k in client_stats:
            metrics[f"backend_{k}"] = client_stats[k]
    return df, metrics


def _generate(
    cfg: Config, run_id: str, iteration: int, prompts: pl.DataFrame, policy_version: str, gen, tok, g: Sampling
) -> list[dict]:
    requests = []  # (prompt row, sample index, prompt ids, seed); sorted by length to waste less padding
    for row in prompts.iter_rows(named=True):
        ids = chat_prompt_ids(tok, row["prompt"], cfg.data.system_prompt)
        for s in range(g.samples):
            requests.append((row, s, ids, seeds.derive(*g.seed, row["prompt_id"], s)))
    requests.sort(key=lambda r: len(r[2]))

    # An engine that schedules its own batches (vLLM) gets every request at once: in chunks of batch_size
    # it would wait for each chunk's longest completion with its other slots idle.
    step = max(len(requests), 1) if getattr(gen, "schedules_batches", False) else g.batch_size
    rows = []
    with bar(f"{g.stage} iter {iteration}: samples", len(requests)) as advance:
        for b in range(0, len(requests), step):
            chunk = requests[b : b + step]
            samples = gen.sample(
                [r[2] for r in chunk],
                [r[3] for r in chunk],
                max_new_tokens=g.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
            )
            for (row, s, ids, _), smp in zip(chunk, samples):
                rows.append(
                    {
                        "run_id": run_id,
                        "iteration": iteration,
                        "rollout_id": seeds.rollout_id(run_id, iteration, row["prompt_id"], s),
                        "prompt_id": row["prompt_id"],
                        "sample_index": s,
                        "prompt": row["prompt"],
                        "completion": tok.decode(smp.token_ids, skip_special_tokens=True),
                        "prompt_token_ids": ids,
                        "completion_token_ids": smp.token_ids,
                        "behavior_logprobs": smp.logprobs,
                        "finish_reason": smp.finish_reason,
                        "label": row["label"],
                        "policy_version": policy_version,
                    }
                )
            advance(len(chunk))
            crash_point(f"{g.stage}:mid", iteration)

    return rows
