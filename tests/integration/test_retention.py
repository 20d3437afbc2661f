"""Checkpoint retention (checkpoint.keep_last / keep_every): old checkpoints' files go, the manifests keep
their hashes, verify and gc understand it, training resumes identically, and whoever needs a pruned
checkpoint (a re-score with a live-self evaluator, the audit's probe) is refused in one line first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from rlme_pipeline import scoreset
from rlme_pipeline.config import ConfigError, validate_config
from rlme_pipeline.jobs.audit import audit
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.weights_at import policy_at
from rlme_pipeline.storage import gc, retention
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store
from rlme_pipeline.storage.verify import verify
from tests.conftest import ROOT, demo_dict


def micro(storage: str, iterations: int, **retain) -> dict:
    """2 prompts x 2 samples, a frozen other and a live-self evaluator (it needs iteration i-1's checkpoint)."""
    d = demo_dict()
    d["run"].update(id="keep", storage=storage, iterations=iterations)
    d["data"].update(prompts_per_iteration=2)
    d["evaluators"] = [d["evaluators"][0], {"name": "live", "model": "policy", "weight": 0.5}]
    d["questions"] = d["questions"][:1]
    d["generation"].update(group_size=2, max_new_tokens=8)
    d["probe"]["every"] = 0
    if retain:
        d["checkpoint"] = retain
    return d


def contents(run: Run) -> dict[str, str]:
    """logical name -> sha256 of every committed file (the manifests, pruned files included)."""
    return {f.logical: f.sha256 for i in run.committed() for f in run.manifest(i).files}


def ckpt_files(run: Run, i: int):
    return checkpoint.files_of(run.manifest(i).files, i)


def test_retention_fields_are_operational_and_checked():
    d = micro("./runs", 2)
    plain, kept = validate_config(d), validate_config({**d, "checkpoint": {"keep_last": 2, "keep_every": 5}})
    assert plain.hash() == kept.hash()  # retention decides what is kept, not what is computed
    with pytest.raises(ConfigError, match="keep_every needs keep_last"):
        validate_config({**d, "checkpoint": {"keep_every": 5}})
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        validate_config({**d, "checkpoint": {"keep_last": 0}})
    rule = kept.checkpoint.model_copy(update={"keep_last": 1, "keep_every": 2})
    assert retention.kept([0, 1, 2, 3, 4], rule) == {1, 3, 4}
    assert retention.kept([0, 1, 2], plain.checkpoint) == {0, 1, 2}


def check_pruned_run(run: Run, pruned: list[int], kept: list[int], reference: dict[str, str]) -> None:
    """What a pruned run must look like, whatever its store."""
    assert contents(run) == reference  # same computation, and the manifests still list every file's hash
    for i in pruned:
        rec = retention.record(run, i)
        assert rec is not None and {f.path for f in rec.files} == {f.path for f in ckpt_files(run, i)}
        assert not any(run.store.exists(f.path) for f in rec.files)
    for i in kept:
        assert retention.record(run, i) is None
        assert all(run.store.exists(f.path) for f in ckpt_files(run, i))
    rep = verify(run)
    assert rep.ok, rep.problems
    assert rep.pruned_iterations == pruned
    assert rep.pruned_files == sum(len(ckpt_files(run, i)) for i in pruned)
    assert gc.plan(run).files == []  # neither PRUNED.json nor anything kept is a leftover


def test_pruned_run_verifies_collects_and_resumes_identically(tiny_models, tmp_path):
    ref_cfg = validate_config(micro(str(tmp_path / "all"), 4))
    ref = Run.for_config(ref_cfg)
    train(ref_cfg, ref)
    reference = contents(ref)
    assert verify(ref).pruned_iterations == [] and retention.pruned_iterations(ref) == []  # default: keep all

    cfg = validate_config(micro(str(tmp_path / "pruned"), 4, keep_last=1, keep_every=2))
    run = Run.for_config(cfg)
    train(cfg.with_overrides(iterations=3), run)  # committed 0..2: kept 1 (every 2nd) and 2 (the last)
    assert retention.pruned_iterations(run) == [0]
    train(cfg, run)  # resumes from the newest checkpoint, after pruning; then 2 goes too
    check_pruned_run(run, pruned=[0, 2], kept=[1, 3], reference=reference)

    # whoever needs a pruned checkpoint gets one line naming it, before anything loads or is written
    with pytest.raises(retention.CheckpointPruned, match=r"checkpoint of iteration 0 \(the policy of iteration 1") as e:
        policy_at(run, cfg, 1)
    assert "\n" not in str(e.value) and "iterations [1, 3]" in str(e.value)  # what is still there
    with pytest.raises(retention.CheckpointPruned, match=r"checkpoints of iterations \[0, 2\] were pruned") as e:
        rescore(run, "again", questions=list(cfg.questions))
    assert "choose --iterations among [0, 2]" in str(e.value) and "\n" not in str(e.value)
    assert not run.store.exists("scoresets/again")  # refused before the definition or any shard
    rescore(run, "kept", questions=list(cfg.questions), iterations="2")  # after a kept checkpoint: fine
    assert scoreset.unit(run, "kept").committed()
    with pytest.raises(retention.CheckpointPruned, match="--probe-prompts 0 skips the probe"):
        audit(run, Store(str(tmp_path / "audit")), probe_prompts=1)  # the probe's live self is iteration 2's
    assert audit(run, Store(str(tmp_path / "audit")), probe_prompts=0)
    assert verify(run).ok and gc.plan(run).files == []


def test_pruning_on_s3(tiny_models, s3):
    ref_cfg = validate_config(micro(s3.url("all"), 3))
    train(ref_cfg, ref := Run.for_config(ref_cfg))
    cfg = validate_config(micro(s3.url("pruned"), 3, keep_last=1))
    run = Run.for_config(cfg)
    train(cfg.with_overrides(iterations=2), run)
    train(cfg, run)  # a new process's pool: iteration 2 downloads checkpoint 1 (the download cache is keyed by content)
    check_pruned_run(run, pruned=[0, 1], kept=[2], reference=contents(ref))
    # this machine's download-cache copy of a pruned checkpoint goes with it
    assert not (checkpoint.cache_dir() / "checkpoints" / checkpoint._cache_key(ckpt_files(run, 0))).exists()
    with pytest.raises(retention.CheckpointPruned, match=r"iterations \[1, 2\] cannot be re-scored"):
        rescore(run, "again", questions=list(cfg.questions))


def test_a_crash_between_the_record_and_the_deletion_is_finished_by_gc(tiny_models, tmp_path):
    """SIGKILL right after PRUNED.json is created: nothing is reported missing, gc deletes the rest."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(micro(str(tmp_path / "runs"), 2, keep_last=1)))
    script = (
        "import sys; from rlme_pipeline.config import load_config; from rlme_pipeline.storage.run import Run; "
        "from rlme_pipeline.jobs.train import train; cfg = load_config(sys.argv[1]); train(cfg, Run.for_config(cfg))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLME_CRASH_AT": "prune:recorded@0"}
    out = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True)
    assert out.returncode == -9, out.stderr[-2000:]
    cfg = validate_config(yaml.safe_load(path.read_text()))
    run = Run.for_config(cfg)
    assert run.committed() == [0, 1] and retention.record(run, 0) is not None
    left = sorted(f.path for f in ckpt_files(run, 0))
    assert all(run.store.exists(p) for p in left)  # recorded, not deleted yet
    assert verify(run).ok and verify(run).pruned_iterations == [0]
    assert gc.plan(run).files == left
    gc.apply(run)
    assert not any(run.store.exists(p) for p in left) and verify(run).ok and gc.plan(run).files == []
    train(cfg.with_overrides(iterations=3), run)  # and training goes on
    assert retention.pruned_iterations(run) == [0, 1]


def test_a_pruning_record_that_lists_other_files_is_a_problem(tiny_models, tmp_path):
    cfg = validate_config(micro(str(tmp_path / "runs"), 2, keep_last=1))
    train(cfg, run := Run.for_config(cfg))
    rec = retention.record(run, 0)
    rewards = next(f for f in run.manifest(0).files if f.logical.endswith("rewards.parquet"))
    run.store.write_json(retention.rel(0), {**rec.model_dump(mode="json"), "files": [rewards.model_dump(mode="json")]})
    rep = verify(run)
    assert not rep.ok and any(
        "lists files that are not this iteration's committed checkpoint" in p for p in rep.problems
    )
    assert any("missing" in p for p in rep.problems)  # the deleted checkpoint is not accounted for any more
