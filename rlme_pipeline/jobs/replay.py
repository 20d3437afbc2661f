"""Resuming after a light checkpoint (checkpoint.full_every > 1): the updates since the last full state,
replayed on the committed tables.

    last_full(run, i)         the newest iteration before i whose checkpoint holds the whole training state
                              (-1: none yet, so the initial policy with a fresh optimizer and the seed's RNG)
    replay(cfg, run, i, ...)  the policy that update i trains, as the uninterrupted process holds it: the full
                              state f loaded, update(f+1 .. i-1) run again on their rollouts and rewards (no
                              generation, no scoring), each compared with its committed weights

An update is a function of its start weights, optimizer state and torch RNG and of its iteration's rollouts
and rewards, all stored, so the replay recomputes what the interrupted process held in memory. On a CPU the
kernels are deterministic: the replayed weights hash equal to the committed ones, and anything else means
that this machine computes another run (torch build, thread count, CPU), which would silently fork the
committed one, so it is refused in one line (`ReplayMismatch`). On a GPU, atomics in the backward pass make
a replay differ by rounding: the largest absolute difference from the committed weights the next update
starts from is measured and recorded in that update's metrics (`replay_max_abs_diff`) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlme_pipeline.config import Config
from rlme_pipeline.jobs.policy_update import update_policy
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.loading import Loaded
from rlme_pipeline.models.weights_at import initial_policy
from rlme_pipeline.storage import retention
from rlme_pipeline.storage.run import CorruptRun, Run
from rlme_pipeline.storage.store import FileEntry


class ReplayMismatch(RuntimeError):
    """A replayed update on a CPU did not reproduce its committed weights."""


def last_full(run: Run, before: int) -> int:
    """The newest iteration < `before` whose checkpoint holds the whole training state; -1 when none does."""
    for j in range(before - 1, -1, -1):
        if checkpoint.is_full(checkpoint.files_of(run.files(j), j)):
            return j
    return -1


def needed(run: Run, i: int) -> bool:
    """Whether update i, with nothing kept in memory, must replay: its start checkpoint (i-1's) is light."""
    return i > 0 and not checkpoint.is_full(checkpoint.files_of(run.files(i - 1), i - 1))


def replay(
    cfg: Config, run: Run, i: int, reference: torch.nn.Module | None, load: Callable[[str], Loaded]
) -> tuple[Loaded, dict]:
    """(the policy update i trains, with its optimizer and RNG in memory; metrics for update i's record).
    `load(path)`: the model at path in the training dtype, the caller's to train (ModelPool.take)."""
    f = last_full(run, i)
    start = _full_state_dir(run, f) if f >= 0 else initial_policy(cfg).path
    lm = load(start)  # its optimizer state and RNG come from `start` in the first update_policy
    metrics: dict = {"replayed_updates": i - 1 - f}
    for j in range(f + 1, i):
        done = update_policy(cfg, run, j, start, lm, reference, write=False)
        lm = replace(lm, optimizer=done.optimizer, rng=done.rng)
        files = checkpoint.files_of(run.files(j), j)
        dtype = None if checkpoint.is_full(files) else cfg.policy.dtype
        replayed = checkpoint.weights_in(lm.model, dtype)
        committed = checkpoint.weights_entry(files)
        if j == i - 1 or _exact(cfg):
            metrics |= compare(cfg.policy.device, run, j, f, committed, replayed, partial(_load_weights, run, j, files))
    return lm, metrics


def compare(
    device: str,
    run: Run,
    j: int,
    f: int,
    committed: FileEntry,
    replayed: dict[str, torch.Tensor],
    load_committed: Callable[[], dict[str, torch.Tensor]],
) -> dict:
    """The replayed weights of update j against the committed ones: on a CPU their sha256 must match (else
    ReplayMismatch); on any other device the largest absolute difference is returned as a metric."""
    if torch.device(device).type == "cpu":
        sha = checkpoint.weights_sha256(replayed)
        if sha != committed.sha256:
            raise ReplayMismatch(
                f"{run.url}: replaying the update of iteration {j} from the full state of iteration {f} gives "
                f"weights with sha256 {sha[:12]}, the committed checkpoint {committed.sha256[:12]}: this CPU "
                "does not recompute the run (another torch build, thread count or CPU than the one that trained "
                "it), so it cannot continue from a light checkpoint; resume where it was trained, or keep every "
                "full state with checkpoint.full_every: 1 (docs/storage.md)"
            )
        return {}
    theirs = load_committed()
    drift = max(
        ((t.float() - theirs[k].to(t.device).float()).abs().max().item() for k, t in replayed.items() if t.numel()),
        default=0.0,
    )
    return {"replay_max_abs_diff": drift}


def _exact(cfg: Config) -> bool:
    return torch.device(cfg.policy.device).type == "cpu"


def _full_state_dir(run: Run, f: int) -> str:
    """Iteration f's full checkpoint as a local directory, checked first: the replay trusts every byte of it."""
    retention.require(run, f, "the full training state a resume replays from")
    files = checkpoint.files_of(run.files(f), f)
    if run.store.local_path() is not None and (problems := run.check_files(files)):
        raise CorruptRun(f"{run.url}: the full state of iteration {f} is damaged: {'; '.join(problems)}")
    return checkpoint.local_dir(run, f, files)  # on object storage: a download verified against each sha256


def _load_weights(run: Run, j: int, files: list[FileEntry]) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint.local_dir(run, j, files)) / checkpoint.WEIGHTS)
