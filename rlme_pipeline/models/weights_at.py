"""Which weights play which role at an iteration: the policy that generated it and each evaluator."""

from __future__ import annotations

from dataclasses import dataclass

from rlme_pipeline.config import FROZEN_SELF, LIVE_SELF, Config, EvaluatorConfig
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.loading import master_dtype, resolve_ref, weights_version
from rlme_pipeline.storage import retention
from rlme_pipeline.storage.run import Run


@dataclass(frozen=True)
class ModelRef:
    path: str  # local directory or hub id, ready for from_pretrained
    version: str  # content hash of the weights
    dtype: str
    device: str
    base: str | None = None  # set when `path` is a LoRA adapter checkpoint: the base model it adapts (adapters.py)


def initial_policy(cfg: Config) -> ModelRef:
    path = resolve_ref(cfg.resolve(cfg.policy.model))
    return ModelRef(path, weights_version(path), cfg.policy.dtype, cfg.policy.device)


def policy_at(run: Run, cfg: Config, iteration: int) -> ModelRef:
    """The weights that generate iteration i: the initial model, else iteration i-1's checkpoint."""
    if iteration == 0:
        return initial_policy(cfg)
    files = checkpoint.files_of(run.files(iteration - 1), iteration - 1)
    if not files:
        raise FileNotFoundError(
            f"{run.url}: iteration {iteration - 1} has no checkpoint yet; run its update stage first"
        )
    retention.require(
        run, iteration - 1, f"the policy of iteration {iteration}: it generated it, a live-self evaluator judges it"
    )
    path = checkpoint.local_dir(run, iteration - 1, files)
    base = initial_policy(cfg).path if cfg.policy.lora is not None else None
    return ModelRef(path, checkpoint.weights_entry(files).sha256, cfg.policy.dtype, cfg.policy.device, base)


def evaluator_at(run: Run, cfg: Config, ev: EvaluatorConfig, iteration: int) -> ModelRef:
    if ev.model == LIVE_SELF:
        return policy_at(run, cfg, iteration)
    if ev.model == FROZEN_SELF:
        return initial_policy(cfg)
    path = resolve_ref(cfg.resolve(ev.model))
    return ModelRef(path, weights_version(path), ev.dtype, ev.device)


def frozen_keys(cfg: Config) -> set[tuple[str, str, str]]:
    """Pool keys (path, dtype, device) of the models a training process holds that never train: each
    frozen-other evaluator, and the initial policy when it is the frozen self or the KL reference (in a
    LoRA run those are the base with its adapters off: no model of their own)."""
    keys = {
        (resolve_ref(cfg.resolve(ev.model)), ev.dtype, ev.device)
        for ev in cfg.evaluators
        if ev.model not in (LIVE_SELF, FROZEN_SELF)
    }
    uses_initial = cfg.algorithm.beta > 0 or any(ev.model == FROZEN_SELF for ev in cfg.evaluators)
    if uses_initial and cfg.policy.lora is None:
        keys.add((resolve_ref(cfg.resolve(cfg.policy.model)), cfg.policy.dtype, cfg.policy.device))
    return keys


def hf_reads_policy(cfg: Config) -> bool:
    """Whether an hf model reads the trained policy in its own dtype: the hf generator, or a live-self
    evaluator judging on hf. Otherwise (vLLM generates, no live self on hf) a half-precision policy keeps
    no inference copy beside its fp32 master: the engine takes the master's tensors (cast as pushed)."""
    live_self_on_hf = cfg.scoring.backend == "hf" and any(ev.model == LIVE_SELF for ev in cfg.evaluators)
    return cfg.generation.backend == "hf" or live_self_on_hf


def pool_capacity(cfg: Config) -> int:
    """How many models one training process uses again and again: the frozen ones, the policy's master
    weights and, for a half-precision policy that hf reads, its inference copy (the live self is that copy); one
    base for a LoRA policy; and a model proposer (evolve). Its model pool holds all of them, so none is
    reloaded between iterations (each reload also re-read the optimizer state from disk)."""
    base = (resolve_ref(cfg.resolve(cfg.policy.model)), cfg.policy.dtype, cfg.policy.device)
    if cfg.policy.lora is not None:
        trained = {base}
    else:
        half = master_dtype(cfg.policy.dtype) != cfg.policy.dtype
        trained = {("master",), ("inference",)} if half and hf_reads_policy(cfg) else {("master",)}
    proposer = cfg.evolve is not None and cfg.evolve.proposer != "rules"
    return len(frozen_keys(cfg) | trained) + int(proposer)
