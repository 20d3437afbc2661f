"""Re-scoring a trained run: complete score sets, untouched training data, resume without duplicates, S3."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rlme_pipeline import scoreset
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.storage.run import CorruptRun, Run
from rlme_pipeline.storage.store import Store
from tests.conftest import copy_run, trained_demo

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
    return trained_demo(tmp_path_factory.mktemp("trained"), iterations=2)


@pytest.fixture(scope="module")
def trained_10gt(tmp_path_factory, tiny_models) -> Run:
    """The demo as RLME-10GT: a tenth of the rollouts rewarded by exact match against the label."""
    return trained_demo(tmp_path_factory.mktemp("trained-10gt"), iterations=2, eval=None, label_reward={"share": 0.1})


@pytest.fixture
def run(trained_run, tmp_path) -> Run:
    return copy_run(trained_run, tmp_path)


@pytest.fixture
def questions_file(tmp_path) -> Path:
    p = tmp_path / "questions.yaml"
    p.write_text(QUESTIONS, encoding="utf-8")
    return p


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "scoresets" not in p.parts
    }


def test_rescore_is_complete_and_leaves_training_untouched(run, questions_file):
    before = tree_hashes(Path(run.store.root))
    qs = scoreset.load_questions(questions_file)
    m = rescore(run, "v2", questions=qs, shard_rows=7)  # 7 does not divide 32: uneven shards
    assert tree_hashes(Path(run.store.root)) == before

    cfg = run.config()
    J, K = len(cfg.evaluators), len(qs)
    v, w = {e.name: e.weight for e in cfg.evaluators}, {q.id: q.weight for q in qs}
    ss = Path(run.store.root) / "scoresets" / "v2"
    assert not (ss / "_shards").exists()
    for i in (0, 1):
        rollouts = run.read_table(i, "rollouts.parquet")
        scores = scoreset.read_table(run, "v2", i, "scores.parquet")
        rewards = scoreset.read_table(run, "v2", i, "rewards.parquet")
        # the documented layout, under attempt-unique names
        assert {p.name.split(".")[0] for p in (ss / f"iter-{i:06d}").iterdir()} == {"scores", "rewards"}
        assert scores.height == rollouts.height * J * K
        assert scores.select("rollout_id", "evaluator", "question_id").n_unique() == scores.height
        assert set(scores["rollout_id"]) == set(rollouts["rollout_id"])
        assert (scores["scoreset"] == "v2").all() and (scores["status"] == "ok").all()
        assert sorted(rewards["rollout_id"]) == sorted(rollouts["rollout_id"])
        # reward = sum v_j w_k max(logp, floor), with the negative weight penalising
        expected = (
            scores.with_columns(
                t=pl.max_horizontal("logp_yes", pl.lit(cfg.scoring.logp_floor))
                * pl.col("evaluator").replace_strict(v)
                * pl.col("question_id").replace_strict(w)
            )
            .group_by("rollout_id")
            .agg(pl.col("t").sum())
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
        assert f["path"].startswith("scoresets/v2/iter-") and f["path"] != f["name"]
        assert run.store.sha256(f["path"]) == f["sha256"]

    # A committed name is refused, with or without --resume of a different definition.
    with pytest.raises(scoreset.ScoresetExists, match="already exists"):
        rescore(run, "v2", questions=qs)
    with pytest.raises(scoreset.ScoresetExists, match="different definition"):
        rescore(run, "v2", questions=qs[:1], shard_rows=7, resume=True)
    # Resuming a complete score set is a no-op that returns its manifest.
    assert rescore(run, "v2", questions=qs, shard_rows=7, resume=True)["definition_hash"] == m["definition_hash"]


def test_interrupted_rescore_resumes_without_duplicates(run, questions_file, backends):
    qs = scoreset.load_questions(questions_file)
    defn = scoreset.plan(run, "v3", questions=qs, iterations="1:2", shard_rows=10)
    todo = scoreset.shards(defn)
    rows = run.manifest(1).files[0].rows  # the rollouts of iteration 1, 10 to a shard
    assert {i for i, _ in todo} == {1} and len(todo) == -(-rows // 10) >= 3
    first = scoreset.score_shard(run, "v3", *todo[0], backends)
    scoreset.score_shard(run, "v3", *todo[1], backends)
    # The process dies while writing shard 2: a data file lands, its manifest never does.
    torn = scoreset.shard_unit(run, "v3", *todo[2]).rel("scores.deadbeef.parquet")
    run.store.write_bytes(torn, b"torn")

    with pytest.raises(scoreset.ScoresetExists, match="--resume"):
        rescore(run, "v3", questions=qs, iterations="1:2", shard_rows=10)
    defn2 = scoreset.plan(run, "v3", questions=qs, iterations="1:2", shard_rows=10, resume=True)
    assert defn2.hash() == defn.hash()
    again = [scoreset.score_shard(run, "v3", i, s, backends) for i, s in todo]
    assert [a["ran"] for a in again] == [False, False] + [True] * (len(todo) - 2)
    assert again[0]["files"] == first["files"]  # the committed shard was not rewritten
    scoreset.finalize(run, "v3")

    scores = scoreset.read_table(run, "v3", 1, "scores.parquet")
    n = run.manifest(1).files[0].rows
    assert scores.height == n * 2 * 3
    assert scores.select("rollout_id", "evaluator", "question_id").n_unique() == scores.height
    assert not (Path(run.store.root) / "scoresets" / "v3" / "iter-000000").exists()


def test_rescore_flow_cli_on_s3(run, tmp_path, monkeypatch):
    """The CLI drives the Prefect flow against a real S3 endpoint, with a live-self evaluator whose
    checkpoint has to come down from the bucket."""
    import boto3
    import s3fs
    from moto import server as moto_server
    from rlme_flows.cli import app
    from typer.testing import CliRunner

    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
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
        res = CliRunner().invoke(
            app,
            [
                "rescore",
                "s3://rlme-test/runs/demo",
                "--name",
                "live-v1",
                "--questions",
                str(qs),
                "--evaluators",
                str(evs),
                "--shard-rows",
                "16",
            ],
        )
        assert res.exit_code == 0, res.output
        s3.fs.invalidate_cache()
        after = {p: s3.fs.info(p)["ETag"] for p in s3.fs.find("rlme-test/runs/demo") if "/scoresets/" not in p}
        assert after == before
        run_s3 = Run.from_url("s3://rlme-test/runs/demo")
        m = run_s3.store.read_json("scoresets/live-v1/MANIFEST.json")
        # live self at iteration 1 is iteration 0's checkpoint: a different version than at iteration 0
        assert m["evaluators"][0]["versions"]["0"] != m["evaluators"][0]["versions"]["1"]
        scores = scoreset.read_table(run_s3, "live-v1", 1, "scores.parquet")
        assert scores.height == run.manifest(1).files[0].rows and (scores["evaluator"] == "live").all()
        with pytest.raises(scoreset.ScoresetExists, match="already exists"):
            scoreset.plan(run_s3, "live-v1", questions=scoreset.load_questions(qs))
    finally:
        srv.stop()
        s3fs.S3FileSystem.clear_instance_cache()  # no later test may reach this stopped endpoint


@pytest.mark.parametrize("trained", ["trained_run", "trained_10gt"])
def test_rescore_with_the_runs_own_judges_reproduces_its_training_rewards(trained, request, tmp_path):
    """The same rollouts, questions and evaluators give the same scores, rewards and advantages as
    training, bit for bit: the re-score aggregates with the training aggregation, label-reward mix
    included (RLME-10GT). One shard per iteration (the default 256 rows hold its 32), so the evaluator
    sees the same batches as in training: padding to another batch's length moves logits in the last bits."""
    run = copy_run(request.getfixturevalue(trained), tmp_path)
    cfg = run.config()
    rescore(run, "same", questions=list(cfg.questions), evaluators=list(cfg.evaluators))
    label_rewarded = 0
    for i in run.committed():
        key = ["rollout_id", "evaluator", "question_id"]
        assert_frame_equal(
            scoreset.read_table(run, "same", i, "scores.parquet").drop("scoreset").sort(key),
            run.read_table(i, "scores.parquet").drop("scoreset").sort(key),
            check_exact=True,
        )
        trained_rewards = run.read_table(i, "rewards.parquet").sort("rollout_id")
        assert_frame_equal(
            scoreset.read_table(run, "same", i, "rewards.parquet").sort("rollout_id"), trained_rewards, check_exact=True
        )
        label_rewarded += int((trained_rewards["n_components"] == 1).sum())
    assert (label_rewarded > 0) == (trained == "trained_10gt")  # the mix really was exercised


def test_rescore_scores_with_the_runs_vllm_settings(run, questions_file, monkeypatch):
    """vllm.url / vllm.python of the run's config reach the re-score's scoring (operational: not hashed)."""
    meta = run.store.read_json("run.json")
    meta["config"]["vllm"] = {"url": "http://vllm.example:8000", "max_concurrency": 3}
    run.store.write_json("run.json", meta)
    seen = []
    real = scoreset.score_rollouts
    # the shards score through the Backends that rescore opened: its vLLM settings are the run's
    monkeypatch.setattr(scoreset, "score_rollouts", lambda *a, **kw: seen.append(a[-1].vllm) or real(*a, **kw))
    rescore(run, "v4", questions=scoreset.load_questions(questions_file), iterations="1", shard_rows=64)
    assert seen and all(v.url == "http://vllm.example:8000" and v.max_concurrency == 3 for v in seen)


def test_verify_and_gc_cover_score_sets(run, questions_file, backends):
    from rlme_pipeline.storage import gc
    from rlme_pipeline.storage.verify import verify

    qs = scoreset.load_questions(questions_file)
    m = rescore(run, "v2", questions=qs, shard_rows=16)
    rep = verify(run)
    assert rep.ok and rep.checked_scoresets == ["v2"], rep.problems
    # A re-score in progress: one shard committed, one killed before its manifest.
    todo = scoreset.shards(scoreset.plan(run, "v5", questions=qs[:1], iterations="1", shard_rows=10))
    scoreset.score_shard(run, "v5", *todo[0], backends)
    done, killed = scoreset.shard_unit(run, "v5", *todo[0]), scoreset.shard_unit(run, "v5", *todo[1])
    leftovers = [
        "scoresets/v2/iter-000000/scores.deadbeef.parquet",  # a killed merge of a committed score set
        "scoresets/v2/_shards/iter-000001/shard-00000/scores.deadbeef.parquet",  # shards outlive their merge
        done.rel("rewards.deadbeef.parquet"),  # an attempt that lost the race to commit this shard
    ]
    in_flight = killed.rel("scores.cafe0001.parquet")  # no manifest yet: a re-score may be writing it
    for rel in [*leftovers, in_flight]:
        run.store.write_bytes(rel, b"leftover")
    assert verify(run).ok  # leftovers are not committed data
    assert sorted(gc.plan(run).files) == sorted(leftovers)
    gc.apply(run)
    assert gc.plan(run).files == [] and run.store.exists(in_flight) and verify(run).ok
    assert scoreset.read_table(run, "v2", 1, "rewards.parquet").height == run.manifest(1).files[0].rows

    # A committed score-set file (and a committed shard's file) filled with junk of the same size.
    for f in (m["files"][0], done.manifest().files[0].model_dump()):
        run.store.write_bytes(f["path"], b"\0" * f["bytes"])
    rep = verify(run)
    assert len(rep.problems) == 2 and all("sha256 does not match" in p for p in rep.problems)
    assert m["files"][0]["path"] in rep.problems[0] and done.dir in rep.problems[1]
    with pytest.raises(CorruptRun, match="does not match its committed entry"):
        rescore(run, "v5", questions=qs[:1], iterations="1", shard_rows=10, resume=True)
