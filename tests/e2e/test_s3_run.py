"""A run on a real S3 endpoint (moto) through s3fs: committed, verified, damaged, detected, collected."""

from __future__ import annotations

import json

import pytest

from rlme_pipeline.config import load_config
from rlme_pipeline.jobs.train import Runner, train
from rlme_pipeline.storage import gc
from rlme_pipeline.storage.run import CorruptRun, Run
from rlme_pipeline.storage.verify import verify


@pytest.fixture
def s3_run(s3, micro_config):
    cfg = load_config(micro_config(s3.url(), iterations=1))
    run = Run.for_config(cfg)
    train(cfg, run)
    return cfg, run


def test_train_verify_damage_and_gc_on_s3(s3_run):
    cfg, run = s3_run
    assert run.committed() == [0]
    rep = verify(run)
    assert rep.ok and rep.checked_files >= 8, rep.problems
    m = run.manifest(0)
    assert all(f.path != f.logical for f in m.files)  # attempt-unique physical names

    # A killed attempt's leftovers: an unreferenced data file and an open multipart upload.
    run.store.write_bytes("iter-000000/rollouts.deadbeef.parquet", b"half")
    bucket, _, key = run.store.abs("iter-000000/checkpoint.deadbeef/model.safetensors").partition("/")
    run.store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    p = gc.plan(run)
    assert p.files == ["iter-000000/rollouts.deadbeef.parquet"] and len(p.uploads) == 1
    assert run.store.exists("iter-000000/rollouts.deadbeef.parquet")  # a dry run deletes nothing
    gc.apply(run)
    assert gc.plan(run).files == [] and gc.plan(run).uploads == []
    assert verify(run).ok

    # A committed file whose bytes changed: verify names it, and resume refuses to continue on top of it.
    rewards = next(f for f in m.files if f.logical.endswith("rewards.parquet"))
    good = run.store.read_bytes(rewards.path)
    run.store.write_bytes(rewards.path, good[:-10] + b"0123456789")
    rep = verify(run)
    assert len(rep.problems) == 1 and "sha256 does not match" in rep.problems[0] and rewards.path in rep.problems[0]
    with pytest.raises(CorruptRun, match="iteration 0 is damaged"):
        train(cfg.with_overrides(iterations=2), run)
    run.store.write_bytes(rewards.path, good[:100])  # truncated
    assert "bytes, the manifest says" in verify(run).problems[0]
    run.store.write_bytes(rewards.path, good)

    # A truncated manifest: verify and resume both say which file and what to do.
    manifest = run.store.read_bytes("iter-000000/MANIFEST.json")
    run.store.write_bytes("iter-000000/MANIFEST.json", manifest[: len(manifest) // 2])
    rep = verify(run)
    assert len(rep.problems) == 1 and "MANIFEST.json is not a valid manifest" in rep.problems[0]
    with pytest.raises(CorruptRun, match="MANIFEST.json is not a valid manifest.*delete that MANIFEST.json"):
        train(cfg.with_overrides(iterations=2), run)
    with pytest.raises(CorruptRun):
        gc.plan(run)  # gc never decides what to delete from a damaged commit
    # A manifest that parses but is not this iteration's.
    other = json.loads(manifest)
    other["iteration"] = 7
    run.store.write_bytes("iter-000000/MANIFEST.json", json.dumps(other).encode())
    assert "belongs to run" in verify(run).problems[0]
    run.store.write_bytes("iter-000000/MANIFEST.json", manifest)
    assert verify(run).ok


def test_uncommitted_stage_with_a_damaged_file_reruns(s3, micro_config, backends):
    cfg = load_config(micro_config(s3.url(), iterations=1))
    run = Run.for_config(cfg)
    run.open(cfg)
    runner = Runner(cfg, run, backends)
    rec, _ = runner.run_stage(0, "generate")
    run.store.write_bytes(rec.files[0].path, b"not parquet")
    again, ran = runner.run_stage(0, "generate")
    assert ran and again.files[0].sha256 == rec.files[0].sha256 and again.files[0].path != rec.files[0].path
    assert gc.plan(run).files == [rec.files[0].path]
