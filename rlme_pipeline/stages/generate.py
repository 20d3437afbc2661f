"""generate: G sampled completions per prompt from the policy that this iteration starts from."""

from __future__ import annotations

import time

import polars as pl

from rlme_pipeline import seeds
from rlme_pipeline.backends import select
from rlme_pipeline.config import Config
from rlme_pipeline.crash import crash_point
from rlme_pipeline.data import load_prompts, prompts_for_iteration
from rlme_pipeline.lineage import policy_at
from rlme_pipeline.progress import bar
from rlme_pipeline.run import Run, StageRecord

ROLLOUTS = "rollouts.parquet"


def chat_prompt_ids(tokenizer, prompt: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def generate(cfg: Config, run: Run, iteration: int) -> StageRecord:
    t0 = time.perf_counter()
    g = cfg.generation
    prompts = prompts_for_iteration(load_prompts(cfg), cfg, iteration)
    ref = policy_at(run, cfg, iteration)
    starts_before = len(select.START_SECONDS)
    with select.open_generator(cfg.vllm_settings(), ref, g.backend) as (gen, tok):
        rows = _generate(cfg, run, iteration, prompts, ref, gen, tok)
        client_stats = dict(gen.client.stats) if hasattr(gen, "client") else {}
    server_start = select.START_SECONDS[starts_before:]
    df = pl.DataFrame(rows).sort("prompt_id", "sample_index")
    entry = run.write_table(iteration, ROLLOUTS, df, "rollouts")
    lengths = df["completion_token_ids"].list.len()
    metrics = {
        "completion_tokens_mean": float(lengths.mean()),
        "finish_stop_share": float((df["finish_reason"] == "stop").mean()),
    }
    if server_start:  # loading this iteration's weights into vLLM: the per-iteration reload cost
        metrics["backend_start_seconds"] = float(sum(server_start))
    for k in ("retries", "restarts"):  # openai backend: what it took to get every sample
        if k in client_stats:
            metrics[f"backend_{k}"] = client_stats[k]
    return StageRecord(
        stage="generate", iteration=iteration, files=[entry], seconds=time.perf_counter() - t0, metrics=metrics,
        info={"policy": {"ref": cfg.policy.model, "version": ref.version}, "prompt_ids": prompts["prompt_id"].to_list(),
              "backend": g.backend},
    )


def _generate(cfg: Config, run: Run, iteration: int, prompts: pl.DataFrame, ref, gen, tok) -> list[dict]:
    g = cfg.generation

    requests = []  # (prompt row, sample index, prompt ids, seed); sorted by length to waste less padding
    for row in prompts.iter_rows(named=True):
        ids = chat_prompt_ids(tok, row["prompt"], cfg.data.system_prompt)
        for s in range(g.group_size):
            requests.append((row, s, ids, seeds.derive(cfg.run.seed, iteration, row["prompt_id"], s)))
    requests.sort(key=lambda r: len(r[2]))

    rows = []
    with bar(f"generate iter {iteration}", len(requests)) as advance:
        for b in range(0, len(requests), g.batch_size):
            chunk = requests[b : b + g.batch_size]
            samples = gen.sample(
                [r[2] for r in chunk], [r[3] for r in chunk],
                max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            )
            for (row, s, ids, _), smp in zip(chunk, samples):
                rows.append({
                    "run_id": run.id, "iteration": iteration,
                    "rollout_id": seeds.rollout_id(run.id, iteration, row["prompt_id"], s),
                    "prompt_id": row["prompt_id"], "sample_index": s, "prompt": row["prompt"],
                    "completion": tok.decode(smp.token_ids, skip_special_tokens=True),
                    "prompt_token_ids": ids, "completion_token_ids": smp.token_ids,
                    "behavior_logprobs": smp.logprobs, "finish_reason": smp.finish_reason,
                    "label": row["label"], "policy_version": ref.version,
                })
            advance(len(chunk))
            crash_point("generate:mid", iteration)

    return rows
