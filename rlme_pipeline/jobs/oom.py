"""Out of GPU memory in a stage: one error naming the stage and the config fields that make it fit.

A stage that runs out of memory has written no stage record (the record is the stage's commit, run.py),
so the iteration resumes at that stage; what it may have written are attempt-unique files `rlme gc`
removes. The knobs are split by whether changing them keeps the run: an operational field (not in
`Config.hash()`) may change on resume, an experiment field makes another experiment (a new run.id).
"""

from __future__ import annotations

import gc

import torch

from rlme_pipeline.config import (
    Config,
    EvaluatorConfig,
    GenerationConfig,
    OptimizerConfig,
    PolicyConfig,
    ProbeConfig,
    ScoringConfig,
    VllmConfig,
    hash_rule,
)

OPERATIONAL = "operational"


class StageOutOfMemory(RuntimeError):
    """A stage ran out of accelerator memory; the message says what to turn."""


def knobs(cfg: Config, stage: str) -> list[tuple[type, str, str]]:
    """(section model, dotted field, advice) that lower the stage's peak memory, given what is set now."""
    out: list[tuple[type, str, str]] = []
    half = cfg.policy.dtype == "float32"
    if stage == "generate":
        out.append((GenerationConfig, "generation.batch_size", f"lower than {cfg.generation.batch_size}"))
        if cfg.generation.backend == "vllm":  # the colocated engine's share (jobs/memory.py engine_share)
            share = cfg.vllm.gpu_memory_utilization
            lower = f"lower than {share}" if share else "below the computed share (the engine's startup log gives it)"
            out.append((VllmConfig, "vllm.gpu_memory_utilization", lower))
        elif cfg.generation.backend == "openai":
            out.append((VllmConfig, "vllm.server_args", "--gpu-memory-utilization lower"))
    elif stage in ("score", "probe"):  # the probe scores its answers as the score stage does
        if stage == "probe":
            out.append((ProbeConfig, "probe.prompts", f"lower than {cfg.probe.prompts}"))
        out.append((ScoringConfig, "scoring.batch_size", f"lower than {cfg.scoring.batch_size}"))
        if any(ev.dtype == "float32" for ev in cfg.evaluators):
            out.append((EvaluatorConfig, "evaluators[].dtype", "bfloat16"))
        out.append((EvaluatorConfig, "evaluators[].device", "another GPU for a frozen judge"))
    elif stage == "update":
        opt = cfg.optimizer
        if not opt.gradient_checkpointing:
            out.append((OptimizerConfig, "optimizer.gradient_checkpointing", "true"))
        out.append((OptimizerConfig, "optimizer.logprob_chunk_tokens", f"lower than {opt.logprob_chunk_tokens}"))
        out.append(
            (
                OptimizerConfig,
                "optimizer.micro_batch_size",
                f"lower than {opt.micro_batch_size} (optimizer.grad_accumulation higher keeps the step's size)",
            )
        )
    if stage in ("generate", "update") and cfg.policy.lora is None:
        out.append((PolicyConfig, "policy.lora", "adapters instead of full fine-tuning (no fp32 Adam state)"))
    if stage in ("generate", "update") and half:
        out.append((PolicyConfig, "policy.dtype", "bfloat16"))
    return out


def message(cfg: Config, stage: str, iteration: int, error: str) -> str:
    """One line: what ran out, that nothing was committed, and the knobs (those that keep the run first)."""
    keep, new = [], []
    for model, path, advice in knobs(cfg, stage):
        (keep if hash_rule(model, path.rpartition(".")[2]) == OPERATIONAL else new).append(f"{path}: {advice}")
    fits = "; ".join(
        part
        for part in (
            f"{', '.join(keep)} (these keep the run: change them and resume)" if keep else "",
            f"{', '.join(new)} (part of the experiment: a new run.id)" if new else "",
        )
        if part
    )
    return (
        f"{stage} of iteration {iteration} ran out of GPU memory ({error}); nothing of it was committed, so "
        f"`rlme train` resumes the iteration at {stage}. To fit: {fits}. Memory per model size: docs/gpu.md"
    )


def free() -> None:
    """Give back what the failed attempt held (its tensors died with its frames), so a retry can fit."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
