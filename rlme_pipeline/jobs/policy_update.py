"""The policy update between the run and a checkpoint, written once for one process (jobs/train.py) and
for each FSDP rank (jobs/update_fsdp.py).

stages/update.py is the pure update (tables and a model in, a trained model out). Around it: the
iteration's rollouts and rewards from the run; the optimizer state and the torch RNG from the checkpoint
the update starts from (unless this process kept its optimizer from the previous iteration); the new
checkpoint written (HF weights, optimizer state, trainer state; stages never touch storage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from rlme_pipeline.config import Config
from rlme_pipeline.models import adapters, checkpoint
from rlme_pipeline.models.loading import Loaded
from rlme_pipeline.seeds import derive
from rlme_pipeline.stages.update import Share, update
from rlme_pipeline.storage.run import REWARDS_FILE, ROLLOUTS_FILE, Run
from rlme_pipeline.storage.store import FileEntry

# FSDP: the optimizer over the sharded parameters, built from the one-process state (or None, fresh).
ShardedOptimizer = Callable[[dict | None], torch.optim.Optimizer]
# FSDP: the full weights and one-process optimizer state, gathered onto rank 0's host (None elsewhere).
Gather = Callable[[torch.nn.Module, torch.optim.Optimizer], tuple[dict, dict] | None]


def update_policy(
    cfg: Config,
    run: Run,
    i: int,
    start: str,
    lm: Loaded,
    reference: torch.nn.Module | None,
    *,
    share: Share = Share(),
    sharded_optimizer: ShardedOptimizer | None = None,
    gather: Gather | None = None,
    write: bool = True,
) -> tuple[torch.optim.Optimizer, list[FileEntry], dict]:
    """Train `lm` (starting from the checkpoint or initial model at `start`) on iteration i; returns (its
    optimizer, the checkpoint's files (none where `write` is False: an FSDP rank other than 0), metrics)."""
    rollouts, rewards = run.read_table(i, ROLLOUTS_FILE), run.read_table(i, REWARDS_FILE)
    state = checkpoint.load_optimizer_state(start) if lm.optimizer is None and i > 0 else None
    if sharded_optimizer is not None:  # each rank keeps its cut of every state tensor
        lm, state = replace(lm, optimizer=sharded_optimizer(state)), None
    # The global torch RNG (dropout, if a model has it) continues from the checkpoint the update starts from.
    checkpoint.restore_rng(start if i > 0 else None, derive(cfg.run.seed, "torch"))
    opt, trainer_state, metrics = update(cfg, i, rollouts, rewards, lm, reference, state, share=share)
    if cfg.policy.lora is not None:
        trainer_state["base"] = adapters.base_record(cfg)
    gathered = gather(lm.model, opt) if gather is not None else None  # every rank takes part in the gather
    files = checkpoint.save(run, i, lm.model, lm.tokenizer, opt, trainer_state, gathered=gathered) if write else []
    return opt, files, metrics
