"""Which weights play which role at an iteration: the policy that generated it and each evaluator."""

from __future__ import annotations

from dataclasses import dataclass

from rlme_pipeline.config import FROZEN_SELF, LIVE_SELF, Config, EvaluatorConfig
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.loading import resolve_ref, weights_version
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
