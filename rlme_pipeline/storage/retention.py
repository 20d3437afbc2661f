"""Checkpoint retention: keep the last N committed checkpoints (and every K-th), delete the others' files.

    iter-000003/MANIFEST.json   unchanged: still lists (and hashes) every checkpoint file, pruned or not
    iter-000003/PRUNED.json     which of those files were deleted, when, and under which retention

A checkpoint is what training resumes from and the weights a live-self evaluator judges with. Each one
stands alone: full weights, or a LoRA adapter whose base is the configured `policy.model` (named by hash
in its trainer_state.json), never another checkpoint; the frozen self (`policy@initial`) and the KL
reference are that configured model too, outside the run. So deleting iteration j's checkpoint breaks no
other, and what must stay is only: the newest committed checkpoint (the resume point: keep_last >= 1) and
everything of an iteration not committed yet (never touched here). With checkpoint.full_every > 1 most
checkpoints are light (weights only), and a resume replays the updates since the newest full state: that
full state and every checkpoint after it stay too, whatever keep_last says.

Manifests are write-once, so a deletion is recorded beside the manifest, in PRUNED.json, created
exclusively *before* the first file goes: a crash in between leaves files that `rlme gc` removes, never a
missing file nothing explains. `rlme verify` reports the files it lists as pruned, not damaged, and
whoever needs a pruned checkpoint (a re-score, the audit's probe, training itself through
`lineage.policy_at`) gets one line naming it and the fix (`require`).
"""

from __future__ import annotations

from pydantic import BaseModel

from rlme_pipeline.config import CheckpointConfig
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.run import Run, iter_dir, now
from rlme_pipeline.storage.store import FileEntry

PRUNED = "PRUNED.json"


class CheckpointPruned(ValueError):
    """A checkpoint that retention deleted is needed (a user's choice of iterations, not damage)."""


class Pruned(BaseModel):
    """PRUNED.json: the manifest's entries of the deleted checkpoint files, and why they went."""

    iteration: int
    pruned_at: str
    after_iteration: int  # the newest committed iteration when it was pruned
    keep_last: int
    keep_every: int | None
    files: list[FileEntry]


def kept(committed: list[int], rule: CheckpointConfig, last_full: int | None = None) -> set[int]:
    """The committed iterations whose checkpoints `rule` keeps: all by default; else the last keep_last
    and every i with (i + 1) % keep_every == 0 (the policy after K, 2K, ... updates), and in any case
    `last_full`, the newest checkpoint holding the whole training state, and every one after it: a resume
    replays from that full state, and the light checkpoints after it are the policies the next iterations
    generate with (checkpoint.full_every). None: every checkpoint is a full one."""
    if rule.keep_last is None:
        return set(committed)
    keep = set(sorted(committed)[-rule.keep_last :])
    if rule.keep_every:
        keep |= {i for i in committed if (i + 1) % rule.keep_every == 0}
    if last_full is not None:
        keep |= {i for i in committed if i >= last_full}
    return keep


def newest_full(run: Run, committed: list[int]) -> int:
    """The newest committed iteration whose checkpoint holds the whole training state; -1 when none does
    (a resume then replays from the initial policy)."""
    for i in sorted(committed, reverse=True):
        if checkpoint.is_full(checkpoint.files_of(run.manifest(i).files, i)):
            return i
    return -1


def rel(i: int) -> str:
    return f"{iter_dir(i)}/{PRUNED}"


def record(run: Run, i: int) -> Pruned | None:
    """Iteration i's pruning record, or None while its checkpoint is kept."""
    if not run.store.exists(rel(i)):
        return None
    return Pruned.model_validate(run.store.read_json(rel(i)))


def prune(run: Run, rule: CheckpointConfig) -> list[int]:
    """Delete the checkpoint files of the committed iterations `rule` no longer keeps; returns them.
    Called after each commit, under the training lease. An iteration already recorded is skipped (a
    deletion that a crash cut short is finished by `rlme gc`)."""
    if rule.keep_last is None:
        return []
    committed = run.committed()
    keep = kept(committed, rule, newest_full(run, committed))
    done = []
    for i in committed:
        if i in keep or run.store.exists(rel(i)):
            continue
        files = checkpoint.files_of(run.manifest(i).files, i)
        if not files:
            continue
        rec = Pruned(
            iteration=i,
            pruned_at=now(),
            after_iteration=max(committed),
            keep_last=rule.keep_last,
            keep_every=rule.keep_every,
            files=files,
        )
        run.store.create_json(rel(i), rec.model_dump(mode="json"))  # first: no file goes unexplained
        crash_point("prune:recorded", i)
        for f in files:
            run.store.rm(f.path)
        run.store.rm("/".join(files[0].path.split("/")[:2]), recursive=True)  # the emptied checkpoint.{token}/
        checkpoint.drop_cached(files)
        done.append(i)
    return done


def pruned_iterations(run: Run) -> list[int]:
    return [i for i in run.committed() if run.store.exists(rel(i))]


def require(run: Run, i: int, role: str, fix: str | None = None) -> None:
    """Raise CheckpointPruned when iteration i's checkpoint, needed as `role`, was deleted by retention."""
    rec = record(run, i)
    if rec is None:
        return
    fix = fix or (
        "pick iterations whose checkpoint is kept, or train with a retention that keeps it "
        "(checkpoint.keep_last / checkpoint.keep_every, docs/config.md)"
    )
    raise CheckpointPruned(
        f"{run.url}: the checkpoint of iteration {i} ({role}) was pruned when iteration {rec.after_iteration} was "
        f"committed (checkpoint.keep_last {rec.keep_last}, keep_every {rec.keep_every}); the manifest keeps its "
        f"hashes, not its files. Still on disk: {kept_list(run)}. {fix}"
    )


def kept_list(run: Run) -> str:
    gone = set(pruned_iterations(run))
    have = [i for i in run.committed() if i not in gone]
    return f"the checkpoints of iterations {have}" if have else "no checkpoint"
