"""The commit protocol's central promise, on local disk and on a real S3 endpoint (moto): an iteration is
committed once; a second commit of it (a stale lease holder, a retried task) leaves the first manifest
standing, byte for byte, and gets that manifest back."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from rlme_pipeline.config import validate_config
from rlme_pipeline.storage.run import MANIFEST, CorruptRun, Run, StageRecord, attempt_name
from rlme_pipeline.storage.store import Store

BASE = {
    "data": {"path": "x.jsonl"},
    "policy": {"model": "tiny:policy"},
    "evaluators": [{"name": "e", "model": "tiny:evaluator"}],
    "questions": [{"id": "k", "text": "Good?"}],
}


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path) -> Run:
    root = str(tmp_path / "runs") if request.param == "local" else request.getfixturevalue("s3").url("runs")
    return Run(Store(root), "exp")


def _records(run: Run, i: int, tag: str) -> list[StageRecord]:
    """One attempt's finished stages: data files under attempt-unique names, then their records."""
    out = []
    for stage, seconds in (("generate", 1.23456), ("aggregate", 0.5)):
        logical, physical = run.new_path(i, f"{stage}.bin")
        entry = run.store.write_bytes(physical, f"{tag}:{stage}".encode(), rows=2, name=logical)
        rec = StageRecord(
            stage=stage,
            iteration=i,
            files=[entry],
            seconds=seconds,
            metrics={f"{stage}_metric": tag},
            info={f"{stage}_model": f"{tag}-v1"},
        )
        run.write_stage_record(rec)
        out.append(rec)
    return out


def test_a_commit_lists_every_file_and_the_lineage(run):
    cfg = validate_config({**BASE, "run": {"seed": 7}})
    recs = _records(run, 3, "first")
    assert run.committed() == [] and [f.path for f in run.files(3)] == [r.files[0].path for r in recs]
    m = run.commit(3, cfg, recs)
    assert (m.run_id, m.iteration, m.config_hash) == ("exp", 3, cfg.hash())
    assert m.files == [recs[0].files[0], recs[1].files[0]]
    assert m.lineage == {
        "seed": 7,
        "iteration_seed": [7, 3],
        "generate_model": "first-v1",
        "aggregate_model": "first-v1",
    }
    assert m.timings == {"generate": 1.235, "aggregate": 0.5}
    assert m.metrics == {"generate_metric": "first", "aggregate_metric": "first"}
    assert run.committed() == [3] and run.manifest(3) == m
    assert run.store.read_bytes(run.path(3, "generate.bin")) == b"first:generate"


def test_a_second_commit_of_a_committed_iteration_leaves_the_first_manifest(run):
    cfg = validate_config(BASE)
    first = run.commit(1, cfg, _records(run, 1, "first"))
    stored = run.store.read_bytes(f"iter-000001/{MANIFEST}")
    # another writer finished the same iteration under its own attempt names and commits it too
    late = _records(run, 1, "late")
    assert {f.path for r in late for f in r.files}.isdisjoint(f.path for f in first.files)
    got = run.commit(1, cfg, late)
    assert got == first  # the caller learns which commit stands
    assert run.store.read_bytes(f"iter-000001/{MANIFEST}") == stored
    assert run.store.read_bytes(run.path(1, "generate.bin")) == b"first:generate"
    assert run.committed() == [1]


def test_a_manifest_of_another_iteration_or_a_torn_one_is_refused(run):
    cfg = validate_config(BASE)
    m = run.commit(2, cfg, _records(run, 2, "x"))
    run.store.write_bytes(f"iter-000005/{MANIFEST}", json.dumps(m.model_dump(mode="json")).encode())
    where5, where6 = (re.escape(run.store.where(f"iter-00000{i}/{MANIFEST}")) for i in (5, 6))
    with pytest.raises(CorruptRun, match=rf"^{where5} belongs to run_id 'exp', iteration 2, not iteration 5$"):
        run.manifest(5)
    run.store.write_bytes(f"iter-000006/{MANIFEST}", b'{"run_id": "exp", "iter')
    fix = (
        r"\. The commit of iter-000006 is damaged; nothing was changed\. Inspect it with `rlme verify "
        + re.escape(run.url)
        + r"`; to recompute it, delete that MANIFEST\.json and run `rlme train` again\.$"
    )
    with pytest.raises(
        CorruptRun, match=rf"^{where6} is not a valid manifest \(JSONDecodeError: Unterminated string[^\n]*\){fix}"
    ):
        run.manifest(6)
    run.store.write_bytes(f"iter-000007/{MANIFEST}", b'{"run_id": "exp"}\n')
    with pytest.raises(
        CorruptRun, match=r"is not a valid manifest \(ValidationError: \d+ validation errors for Manifest\)"
    ):
        run.manifest(7)  # only the first line of pydantic's report
    assert run.committed() == [2, 5, 6, 7]  # committed means: a manifest exists; verify judges its contents


def test_attempt_names_are_unique_per_attempt():
    assert attempt_name("iter-000001/rollouts.parquet", "ab12") == "iter-000001/rollouts.ab12.parquet"
    assert attempt_name("iter-000001/checkpoint", "ab12") == "iter-000001/checkpoint.ab12"
    assert attempt_name("run.json", "ff") == "run.ff.json"
    # the token goes after the first dot of the file name, never into a directory name
    assert (
        attempt_name("scoresets/v1.2/iter-000001/scores.parquet", "ab")
        == "scoresets/v1.2/iter-000001/scores.ab.parquet"
    )
    assert (
        attempt_name("iter-000001/model.safetensors.index.json", "ab") == "iter-000001/model.ab.safetensors.index.json"
    )
    a, b = attempt_name("iter-000001/x.parquet"), attempt_name("iter-000001/x.parquet")
    assert a != b and re.fullmatch(r"iter-000001/x\.[0-9a-f]{8}\.parquet", a)  # 32 random bits per attempt


def test_a_crash_just_before_the_manifest_leaves_the_iteration_uncommitted(tmp_path, monkeypatch):
    """The crash hook the resume tests use (RLME_CRASH_AT, a SIGKILL of the process) sits after every
    data file and before the commit point. Here the kill is caught in-process: os.kill raises instead."""
    from rlme_pipeline.storage import crash

    class Killed(BaseException):
        pass

    def kill(pid, sig):
        assert (pid, sig) == (os.getpid(), signal.SIGKILL)
        raise Killed

    monkeypatch.setattr(crash.os, "kill", kill)
    run, cfg = Run(Store(str(tmp_path / "runs")), "exp"), validate_config(BASE)
    recs = _records(run, 4, "x")
    monkeypatch.setenv("RLME_CRASH_AT", "commit:before-manifest@4")
    with pytest.raises(Killed):
        run.commit(4, cfg, recs)
    assert run.committed() == []
    monkeypatch.setenv("RLME_CRASH_AT", "commit:before-manifest@5")  # another iteration's crash point
    run.commit(4, cfg, recs)
    assert run.committed() == [4]


def test_before_the_commit_readers_see_finished_stages_only(run):
    cfg = validate_config(BASE)
    assert run.iterations() == [] and run.files(0) == []
    recs = _records(run, 0, "a")
    run.store.write_bytes("iter-000000/stray.bin", b"left by a killed attempt")
    run.store.write_bytes("iter-x7/whatever.bin", b"not an iteration")
    assert run.iterations() == [0] and run.committed() == []
    assert run.path(0, "aggregate.bin") == recs[1].files[0].path
    with pytest.raises(
        FileNotFoundError,
        match="iter-000000/stray.bin is listed by no manifest or record: not written or not committed yet$",
    ):
        run.path(0, "stray.bin")
    run.commit(0, cfg, recs[:1])  # the manifest decides from now on, not the stage records
    assert [f.logical for f in run.files(0)] == ["iter-000000/generate.bin"]
    with pytest.raises(FileNotFoundError):
        run.path(0, "aggregate.bin")
    _records(run, 11, "b")
    assert run.iterations() == [0, 11] and run.committed() == [0]


def test_a_stage_record_counts_only_while_its_record_and_files_check_out(run):
    """What resume skips: a stage is done when its record parses and every file it lists has the
    recorded hash; anything else (no record, a torn one, a changed or missing file) means run it again."""
    recs = _records(run, 2, "a")
    assert run.stage_record(2, "generate") == recs[0] and run.stage_record(2, "aggregate") == recs[1]
    assert run.stage_record(2, "score") is None  # never written
    run.store.write_bytes(recs[0].files[0].path, b"a:generatX")  # same size, other bytes
    assert run.stage_record(2, "generate") is None
    run.store.rm(recs[1].files[0].path)
    assert run.stage_record(2, "aggregate") is None
    recs = _records(run, 3, "b")
    run.store.write_bytes("iter-000003/stages/generate.json", b'{"stage": "gener')
    assert run.stage_record(3, "generate") is None and run.stage_record(3, "aggregate") == recs[1]


def test_check_files_names_each_missing_resized_or_changed_file(run):
    """Each file against its manifest entry, in the entries' order: missing, then its size, then (where
    hash_if says so) its sha256; nothing at all when every file checks out."""
    gen, agg = (r.files[0] for r in _records(run, 1, "ok"))
    assert run.check_files([gen, agg]) == []
    gone = gen.model_copy(update={"path": "iter-000001/gone.bin", "name": "iter-000001/gone.x"})
    run.store.write_bytes(gen.path, b"ok:GENERATE")  # the same length ("ok:generate"), other bytes
    run.store.write_bytes(agg.path, b"ok")  # shorter than "ok:aggregate"
    where = run.store.where
    assert run.check_files([gone, gen, agg]) == [
        f"{where(gone.path)}: missing (listed as iter-000001/gone.x)",
        f"{where(gen.path)}: sha256 does not match the manifest (the file was changed after commit)",
        f"{where(agg.path)}: 2 bytes, the manifest says {agg.bytes} (truncated or replaced)",
    ]
    assert agg.bytes == len(b"ok:aggregate")
    # the size is always checked, the hash only where hash_if asks (train skips it for big local files)
    assert run.check_files([gen, agg], hash_if=lambda f: f.path != gen.path) == run.check_files([agg])
    assert len(run.check_files([gen])) == 1 and run.check_files([gen], hash_if=lambda f: False) == []
