"""Re-scoring a trained run: complete score sets, untouched training data, resume without duplicates, S3."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import polars as pl
import pytest

from rlme_pipeline import scoreset
from rlme_pipeline.iteration import train
from rlme_pipeline.run import Run
from rlme_pipeline.storage import Store

from tests.conftest import DEMO

QUESTIONS = """\
- id: quoted
  text: 'Does the answer say "42" and {not} {0} or {{braces}}?'
  weight: 1.0
- id: unicode
  text: "Est-ce que la réponse est correcte ? 答えは正しいですか？ ✓"
  weight: -0.5
- id: plain
  text: Is the answer short?
  weight: 0.25
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_models) -> Run:
    """Two committed iterations of the demo, trained once for the module (each test copies it)."""
    from rlme_pipeline.config import load_config

    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(DEMO).with_overrides(storage=str(root / "runs"), iterations=2)
    run = Run(Store(cfg.run.storage), cfg.run.id)
    train(cfg, run)
    return run


@pytest.fixture
def run(trained_run, tmp_path) -> Run:
    shutil.copytree(trained_run.store.root, tmp_path / "runs" / "demo")
    return Run(Store(str(tmp_path / "runs")), "demo")


@pytest.fixture
def questions_file(tmp_path) -> Path:
    p = tmp_path / "questions.yaml"
    p.write_text(QUESTIONS, encoding="utf-8")
    return p


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "scoresets" not in p.parts}


def test_rescore_is_complete_and_leaves_training_untouched(run, questions_file):
    before = tree_hashes(Path(run.store.root))
    qs = scoreset.load_questions(questions_file)
    m = scoreset.rescore(run, "v2", questions=qs, shard_rows=7)  # 7 does not divide 32: uneven shards
    assert tree_hashes(Path(run.store.root)) == before

    cfg = run.config()
    J, K = len(cfg.evaluators), len(qs)
    v, w = {e.name: e.weight for e in cfg.evaluators}, {q.id: q.weight for q in qs}
    ss = Path(run.store.root) / "scoresets" / "v2"
    assert not (ss / "_shards").exists()
    for i in (0, 1):
        rollouts = run.read_table(i, "rollouts.parquet")
        scores = pl.read_parquet(ss / f"iter-{i:06d}" / "scores.parquet")
        rewards = pl.read_parquet(ss / f"iter-{i:06d}" / "rewards.parquet")
        assert scores.height == rollouts.height * J * K
        assert scores.select("rollout_id", "evaluator", "question_id").n_unique() == scores.height
        assert set(scores["rollout_id"]) == set(rollouts["rollout_id"])
        assert (scores["scoreset"] == "v2").all() and (scores["status"] == "ok").all()
        assert sorted(rewards["rollout_id"]) == sorted(rollouts["rollout_id"])
        # reward = sum v_j w_k max(logp, floor), with the negative weight penalising
        expected = (
            scores.with_columns(t=pl.max_horizontal("logp_yes", pl.lit(cfg.scoring.logp_floor))
                                * pl.col("evaluator").replace_strict(v) * pl.col("question_id").replace_strict(w))
            .group_by("rollout_id").agg(pl.col("t").sum())
        )
        got = rewards.join(expected, on="rollout_id")
        assert (got["reward"] - got["t"]).abs().max() < 1e-9
        assert rewards.group_by("prompt_id").agg(pl.col("advantage").mean())["advantage"].abs().max() < 1e-9

    # The manifest says exactly what was asked, by whom, of which rollouts.
    assert [q["text"] for q in m["questions"]] == [q.text for q in qs]
    assert m["questions"][1]["text"] == "Est-ce que la réponse est correcte ? 答えは正しいですか？ ✓"
    assert [q["weight"] for q in m["questions"]] == [1.0, -0.5, 0.25]
    for i in ("0", "1"):
        assert m["sources"][i]["manifest_sha256"] == run.store.sha256(f"iter-{int(i):06d}/MANIFEST.json")
        assert set(m["evaluators"][0]["versions"]) == {"0", "1"}
    for f in m["files"]:
        assert run.store.sha256(f"scoresets/v2/{f['path']}") == f["sha256"]

    # A committed name is refused, with or without --resume of a different definition.
    with pytest.raises(scoreset.ScoresetExists, match="already exists"):
        scoreset.rescore(run, "v2", questions=qs)
    with pytest.raises(scoreset.ScoresetExists, match="different definition"):
        scoreset.rescore(run, "v2", questions=qs[:1], shard_rows=7, resume=True)
    # Resuming a complete score set is a no-op that returns its manifest.
    assert scoreset.rescore(run, "v2", questions=qs, shard_rows=7, resume=True)["definition_hash"] == m["definition_hash"]


def test_interrupted_rescore_resumes_without_duplicates(run, questions_file):
    qs = scoreset.load_questions(questions_file)
    defn = scoreset.plan(run, "v3", questions=qs, iterations="1:2", shard_rows=10)
    todo = scoreset.shards(defn)
    assert {i for i, _ in todo} == {1} and len(todo) == 4
    first = scoreset.score_shard(run, "v3", *todo[0])
    scoreset.score_shard(run, "v3", *todo[1])
    # The process dies while writing shard 2: its data file lands, its record never does.
    store = scoreset.scoreset_store(run, "v3")
    store.write_bytes("_shards/iter-000001/shard-00002.scores.parquet", b"torn")

    with pytest.raises(scoreset.ScoresetExists, match="--resume"):
        scoreset.rescore(run, "v3", questions=qs, iterations="1:2", shard_rows=10)
    defn2 = scoreset.plan(run, "v3", questions=qs, iterations="1:2", shard_rows=10, resume=True)
    assert defn2.hash() == defn.hash()
    again = [scoreset.score_shard(run, "v3", i, s) for i, s in todo]
    assert [a["ran"] for a in again] == [False, False, True, True]
    assert again[0]["files"] == first["files"]  # the committed shard was not rewritten
    scoreset.finalize(run, "v3")

    scores = pl.read_parquet(Path(store.root) / "iter-000001" / "scores.parquet")
    n = run.manifest(1).files[0].rows
    assert scores.height == n * 2 * 3
    assert scores.select("rollout_id", "evaluator", "question_id").n_unique() == scores.height
    assert not (Path(run.store.root) / "scoresets" / "v3" / "iter-000000").exists()


def test_rescore_flow_cli_on_s3(run, tmp_path, monkeypatch):
    """The CLI drives the Prefect flow against a real S3 endpoint, with a live-self evaluator whose
    checkpoint has to come down from the bucket."""
    import boto3
    from moto import server as moto_server
    from typer.testing import CliRunner

    from flows.cli import app

    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        for k, val in env.items():
            monkeypatch.setenv(k, val)
        boto3.client("s3").create_bucket(Bucket="rlme-test")
        s3 = Store("s3://rlme-test/runs")
        s3.fs.put(run.store.root, "rlme-test/runs/demo", recursive=True)
        s3.fs.invalidate_cache()
        before = {p: s3.fs.info(p)["ETag"] for p in s3.fs.find("rlme-test/runs/demo")}

        evs = tmp_path / "evaluators.yaml"
        evs.write_text("- name: live\n  model: policy\n  weight: 2.0\n")
        qs = tmp_path / "q.yaml"
        qs.write_text("- id: ok\n  text: Is it right?\n")
        res = CliRunner().invoke(app, ["rescore", "s3://rlme-test/runs/demo", "--name", "live-v1",
                                       "--questions", str(qs), "--evaluators", str(evs), "--shard-rows", "16"])
        assert res.exit_code == 0, res.output
        s3.fs.invalidate_cache()
        after = {p: s3.fs.info(p)["ETag"] for p in s3.fs.find("rlme-test/runs/demo") if "/scoresets/" not in p}
        assert after == before
        run_s3 = Run.from_url("s3://rlme-test/runs/demo")
        m = run_s3.store.read_json("scoresets/live-v1/MANIFEST.json")
        # live self at iteration 1 is iteration 0's checkpoint: a different version than at iteration 0
        assert m["evaluators"][0]["versions"]["0"] != m["evaluators"][0]["versions"]["1"]
        scores = run_s3.store.read_parquet("scoresets/live-v1/iter-000001/scores.parquet")
        assert scores.height == run.manifest(1).files[0].rows and (scores["evaluator"] == "live").all()
        with pytest.raises(scoreset.ScoresetExists, match="already exists"):
            scoreset.plan(run_s3, "live-v1", questions=scoreset.load_questions(qs))
    finally:
        srv.stop()
