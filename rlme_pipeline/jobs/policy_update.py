"""The policy update between the run and a checkpoint, written once for one process (jobs/train.py) and
for each FSDP rank (jobs/update_fsdp.py).

stages/update.py is the pure update (tables and a model in, a trained model out). Around it: the
iteration's rollouts and rewards from the run; the optimizer state and the torch RNG from the checkpoint
the update starts from (unless this process kept them from the previous iteration); the new checkpoint
written (HF weights, optimizer state, trainer state; stages never touch storage), or taken for a background
write (checkpoint.background_write), with or without the whole training state (checkpoint.full_every).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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


class NoTrainingState(RuntimeError):
    """An update at iteration > 0 with neither an optimizer in memory nor one in its start checkpoint."""


@dataclass
class Updated:
    """What an update leaves: its optimizer and the torch RNG at its end (kept in memory for the next
    update), its checkpoint (written: `files`; or `taken`, to be written in the background) and metrics."""

    optimizer: torch.optim.Optimizer
    files: list[FileEntry]
    taken: checkpoint.Checkpoint | None
    metrics: dict
    rng: dict[str, torch.Tensor]


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
    full: bool | Callable[[], bool] = True,
    defer: bool = False,
) -> Updated:
    """Train `lm` (starting from the checkpoint or initial model at `start`) on iteration i. The checkpoint
    is written (none where `write` is False: an FSDP rank other than 0, a replayed update), or with `defer`
    only taken, for the caller to write in the background; `full`: with the whole training state
    (checkpoint.take), or a callable asked once the update is done (SIGTERM during it makes it full)."""
    rollouts, rewards = run.read_table(i, ROLLOUTS_FILE), run.read_table(i, REWARDS_FILE)
    state = None
    if lm.optimizer is None and i > 0:
        state = checkpoint.load_optimizer_state(start)
        if state is None:  # never a fresh optimizer in the middle of a run: that would be another run
            raise NoTrainingState(
                f"the update of iteration {i} starts from {start}, which holds no optimizer state (a light "
                "checkpoint, checkpoint.full_every), and this process kept none: it resumes by replaying the "
                "updates since the last full state (jobs/replay.py)"
            )
    if sharded_optimizer is not None:  # each rank keeps its cut of every state tensor
        lm, state = replace(lm, optimizer=sharded_optimizer(state)), None
    # The global torch RNG (dropout, if a model has it) continues from the update before: kept in memory by
    # the process that ran it, else read from the checkpoint the update starts from.
    if lm.rng is not None:
        checkpoint.set_rng(lm.rng)
    else:
        checkpoint.restore_rng(start if i > 0 else None, derive(cfg.run.seed, "torch"))
    opt, trainer_state, metrics = update(cfg, i, rollouts, rewards, lm, reference, state, share=share)
    if cfg.policy.lora is not None:
        trainer_state["base"] = adapters.base_record(cfg)
    rng = checkpoint.rng_state()
    gathered = gather(lm.model, opt) if gather is not None else None  # every rank takes part in the gather
    ckpt = dict(full=full() if callable(full) else full, dtype=cfg.policy.dtype, gathered=gathered)
    if defer:
        taken = checkpoint.take(run, i, lm.model, lm.tokenizer, opt, trainer_state, **ckpt)
        return Updated(opt, [], taken, metrics, rng)
    files = checkpoint.save(run, i, lm.model, lm.tokenizer, opt, trainer_state, **ckpt) if write else []
    return Updated(opt, files, None, metrics, rng)
