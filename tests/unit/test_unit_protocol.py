"""`run.Unit` on its own, local and on moto S3: streamed tables, verified reads, what `rlme gc` keeps, the
one line a damaged commit is reported in, and manifests/records that stay strict JSON."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from rlme_pipeline.storage.run import MANIFEST, Commit, CorruptRun, Manifest, StageRecord, Unit
from rlme_pipeline.storage.store import Store

DIR = "scoresets/v2/_shards/iter-000003/shard-00002"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    root = str(tmp_path / "exp") if request.param == "local" else request.getfixturevalue("s3").url("runs/exp")
    return Store(root)


def _rewards(ids: list[str], reward: float = 0.5) -> pl.DataFrame:
    n = len(ids)
    return pl.DataFrame(
        {
            "rollout_id": ids,
            "prompt_id": ["p"] * n,
            "iteration": [3] * n,
            "reward": [reward] * n,
            "advantage": [0.0] * n,
            "n_components": [2] * n,
            "n_failed": [0] * n,
        }
    )


def _strict(raw: bytes):
    """Parse as any JSON tool would: NaN/Infinity are not JSON."""
    return json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} written"))


def test_a_streamed_table_is_listed_under_its_logical_name_and_reads_back(store):
    unit = Unit(store, DIR, Commit)
    frames = [_rewards(["a", "b"]), _rewards(["c"], reward=1.5)]
    entry = unit.write_stream("rewards.parquet", iter(frames), "rewards")
    assert entry.name == f"{DIR}/rewards.parquet" and entry.rows == 3
    assert entry.path.startswith(f"{DIR}/rewards.") and entry.path.endswith(".parquet")
    assert entry.path != entry.name  # an attempt-unique physical name, never the logical one
    assert (entry.bytes, entry.sha256) == (store.size(entry.path), store.sha256(entry.path))
    again = unit.write_stream("rewards.parquet", iter(frames), "rewards")
    assert again.path != entry.path and again.sha256 == entry.sha256  # a retry never overwrites
    unit.commit(Commit(files=[entry]))
    assert unit.path("rewards.parquet") == entry.path
    got = unit.read_table("rewards.parquet", verify=True)
    assert got.equals(pl.concat(frames))


def test_a_verified_read_refuses_bytes_that_differ_from_the_entry(store):
    unit = Unit(store, DIR, Commit)
    entry = unit.write_table("rewards.parquet", _rewards(["a", "b"]), "rewards")
    unit.commit(Commit(files=[entry]))
    assert unit.read_table("rewards.parquet", verify=True).equals(_rewards(["a", "b"]))
    # same length, other bytes (one id changed): only the sha256 can tell
    forged = unit.write_table("x.parquet", _rewards(["a", "c"]), "rewards")
    data = store.read_bytes(forged.path)
    assert len(data) == entry.bytes and forged.sha256 != entry.sha256
    store.write_bytes(entry.path, data)
    assert unit.read_table("rewards.parquet")["rollout_id"].to_list() == ["a", "c"]  # plain reads do not hash
    with pytest.raises(CorruptRun) as e:
        unit.read_table("rewards.parquet", verify=True)
    assert str(e.value) == (
        f"{store.where(entry.path)} does not match its committed entry (sha256, bytes); see `rlme verify {store.url}`"
    )
    # another length: refused too
    store.write_bytes(entry.path, store.read_bytes(unit.write_table("y.parquet", _rewards(["a"] * 9), "rewards").path))
    with pytest.raises(CorruptRun, match="does not match its committed entry"):
        unit.read_table("rewards.parquet", verify=True)


def test_referenced_names_the_manifest_every_record_and_every_listed_file(store):
    steps = ("generate", "score", "aggregate", "update")  # update: not run yet, no record
    unit = Unit(store, "iter-000003", Manifest, steps)
    files = {}
    for step in ("generate", "score"):
        logical, physical = unit.new_path(f"{step}.bin")
        files[step] = store.write_bytes(physical, step.encode(), name=logical)
        unit.write_record(step, StageRecord(stage=step, iteration=3, files=[files[step]], seconds=1.0))
    store.write_bytes(unit.record_rel("aggregate"), b"{torn")  # a torn record names nothing, a missing one too
    base = {"iter-000003/MANIFEST.json"} | {f"iter-000003/stages/{s}.json" for s in steps}
    assert unit.referenced() == base | {f.path for f in files.values()}
    # committed: the manifest's files are kept too, even one that no record lists
    extra = store.write_bytes(unit.new_path("extra.bin")[1], b"x")
    m = Manifest(
        files=[files["generate"], extra],
        run_id="exp",
        iteration=3,
        committed_at="t",
        config_hash="h",
        lineage={},
        code={},
        timings={},
        metrics={},
    )
    unit.commit(m)
    assert unit.referenced() == base | {f.path for f in files.values()} | {extra.path}
    store.write_bytes(unit.rel(MANIFEST), b"{torn")
    with pytest.raises(CorruptRun):  # never gc around a damaged commit
        unit.referenced()


def _manifest(**kw) -> Manifest:
    fields = dict(
        files=[], run_id="exp", iteration=3, committed_at="t", config_hash="h", lineage={}, code={}, timings={}
    )
    return Manifest(**{**fields, "metrics": {}, **kw})


def test_a_damaged_manifest_says_how_to_remake_it_by_default(store):
    unit = Unit(store, "iter-000003", Manifest)
    store.write_bytes(unit.rel(MANIFEST), b"{torn")
    with pytest.raises(CorruptRun) as e:
        unit.manifest()
    assert str(e.value).endswith("to recompute it, delete that MANIFEST.json and run the command that made it again.")


def test_a_foreign_manifest_names_every_mismatched_field(store):
    Unit(store, "iter-000003", Manifest).commit(_manifest(run_id="other", iteration=4))
    unit = Unit(store, "iter-000003", Manifest, expect={"run_id": "exp", "iteration": 3})
    with pytest.raises(CorruptRun) as e:
        unit.manifest()
    where = store.where(unit.rel(MANIFEST))
    assert str(e.value) == f"{where} belongs to run_id 'other', iteration 4, not run_id 'exp', iteration 3"


def test_a_nan_metric_is_written_as_strict_json(store):
    """A metric over failed judgements only is NaN; NaN is not JSON, so records and manifests write null."""
    unit = Unit(store, "iter-000003", Manifest, ("aggregate",))
    rec = StageRecord(stage="aggregate", iteration=3, files=[], seconds=1.0, metrics={"reward_mean": math.nan})
    unit.write_record("aggregate", rec)
    assert _strict(store.read_bytes(unit.record_rel("aggregate")))["metrics"] == {"reward_mean": None}
    unit.commit(_manifest(metrics={"reward_mean": math.nan}))
    assert _strict(store.read_bytes(unit.rel(MANIFEST)))["metrics"] == {"reward_mean": None}
    assert unit.manifest().metrics == {"reward_mean": None}  # and it reads back
