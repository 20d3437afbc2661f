"""The demo config end to end through the library: what every iteration must leave in storage."""

from __future__ import annotations

import math

import polars as pl
import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlme_pipeline.jobs.train import Runner, train
from rlme_pipeline.storage.run import Run, iter_dir
from rlme_pipeline.storage.store import Store, sha256_file


def _run(cfg) -> Run:
    return Run(Store(cfg.run.storage), cfg.run.id)


@pytest.fixture
def trained(demo_cfg):
    run = _run(demo_cfg)
    manifests = train(demo_cfg, run)
    return demo_cfg, run, manifests


def test_every_iteration_is_complete_and_consistent(trained):
    cfg, run, manifests = trained
    assert [m.iteration for m in manifests] == [0, 1, 2]
    G, J, K = cfg.generation.group_size, len(cfg.evaluators), len(cfg.questions)
    v = {e.name: e.weight for e in cfg.evaluators}
    w = {q.id: q.weight for q in cfg.questions}
    previous = None
    for i in range(3):
        rollouts = run.read_table(i, "rollouts.parquet")
        scores = run.read_table(i, "scores.parquet")
        rewards = run.read_table(i, "rewards.parquet")

        per_prompt = rollouts.group_by("prompt_id").len()
        assert per_prompt.height == cfg.data.prompts_per_iteration
        assert (per_prompt["len"] == G).all()
        assert rollouts["rollout_id"].n_unique() == rollouts.height
        assert (rollouts["completion_token_ids"].list.len() == rollouts["behavior_logprobs"].list.len()).all()
        assert scores.height == rollouts.height * J * K
        assert scores.select("rollout_id", "evaluator", "question_id").n_unique() == scores.height
        assert (scores["status"] == "ok").all()

        # reward = sum_j sum_k v_j w_k max(log p_yes, floor), recomputed independently row by row
        expected = {}
        for r in scores.iter_rows(named=True):
            term = v[r["evaluator"]] * w[r["question_id"]] * max(r["logp_yes"], cfg.scoring.logp_floor)
            expected[r["rollout_id"]] = expected.get(r["rollout_id"], 0.0) + term
        for r in rewards.iter_rows(named=True):
            assert r["reward"] == pytest.approx(expected[r["rollout_id"]], rel=1e-9, abs=1e-9)
        means = rewards.group_by("prompt_id").agg(pl.col("advantage").mean())
        assert means["advantage"].abs().max() < 1e-9  # Dr. GRPO: centred per group

        manifest = run.manifest(i)
        for f in manifest.files:
            assert sha256_file(run.store.abs(f.path)) == f.sha256, f.path
        names = {f.logical.rsplit("/", 1)[-1] for f in manifest.files}
        assert {"rollouts.parquet", "scores.parquet", "rewards.parquet", "model.safetensors"} <= names
        assert f"{iter_dir(i)}/checkpoint/optimizer/state.json" in {f.logical for f in manifest.files}
        assert manifest.lineage["policy_after"] != manifest.lineage["policy_before"]

        ckpt = run.store.abs(run.path(i, "checkpoint/model.safetensors")).rpartition("/")[0]
        AutoModelForCausalLM.from_pretrained(ckpt)  # loadable as an ordinary HF model
        weights = load_file(f"{ckpt}/model.safetensors")
        if previous is not None:
            assert any(not (weights[k] == previous[k]).all() for k in weights), "the update changed nothing"
        previous = weights


def test_resume_continues_instead_of_restarting(demo_cfg):
    run = _run(demo_cfg)
    train(demo_cfg.with_overrides(iterations=2), run)
    before = {i: run.store.read_bytes(f"{iter_dir(i)}/MANIFEST.json") for i in (0, 1)}
    made = train(demo_cfg.with_overrides(iterations=3), run)
    assert [m.iteration for m in made] == [2]
    assert run.committed() == [0, 1, 2]
    assert {i: run.store.read_bytes(f"{iter_dir(i)}/MANIFEST.json") for i in (0, 1)} == before
    assert run.manifest(2).lineage["policy_before"] == run.manifest(1).lineage["policy_after"]


def test_finished_stages_are_skipped_on_resume(demo_cfg, backends):
    """A run that stopped after two stages of an iteration reruns neither of them."""
    cfg = demo_cfg.with_overrides(iterations=1)
    run = _run(cfg)
    run.open(cfg)
    runner = Runner(cfg, run, backends)
    for stage in ("generate", "score"):
        runner.run_stage(0, stage)
    rollouts_before = run.store.read_bytes(run.path(0, "rollouts.parquet"))
    assert runner.run_stage(0, "generate")[1] is False
    assert runner.run_stage(0, "score")[1] is False
    train(cfg, run)
    assert run.store.read_bytes(run.path(0, "rollouts.parquet")) == rollouts_before
    assert run.committed() == [0]


def test_tampered_stage_output_is_recomputed(demo_cfg, backends):
    cfg = demo_cfg.with_overrides(iterations=1)
    run = _run(cfg)
    run.open(cfg)
    runner = Runner(cfg, run, backends)
    rec, _ = runner.run_stage(0, "generate")
    good = run.store.read_bytes(run.path(0, "rollouts.parquet"))
    run.store.write_bytes(rec.files[0].path, b"garbage")
    rec2, ran = runner.run_stage(0, "generate")
    assert ran and rec2.files[0].sha256 == rec.files[0].sha256  # same seed, same rollouts
    assert rec2.files[0].path != rec.files[0].path  # a new attempt file; the damaged one is left for gc
    assert run.store.read_bytes(run.path(0, "rollouts.parquet")) == good


def test_reward_nan_masks_rollout(demo_cfg, backends):
    """A failed judgement (prefix longer than the evaluator's context) is a status and a NaN reward."""
    cfg = demo_cfg.with_overrides(iterations=1)
    long_cfg = cfg.model_copy(
        update={"scoring": cfg.scoring.model_copy(update={"template": "{prompt}\n{completion}\n" + "pad " * 1100})}
    )
    run = _run(long_cfg)
    run.open(long_cfg)
    runner = Runner(long_cfg, run, backends)
    for stage in ("generate", "score", "aggregate"):
        runner.run_stage(0, stage)
    scores = run.read_table(0, "scores.parquet")
    rewards = run.read_table(0, "rewards.parquet")
    assert (scores["status"] == "context_overflow").all() and scores["logp_yes"].is_null().all()
    assert all(math.isnan(r) for r in rewards["reward"]) and (rewards["n_failed"] == 4).all()
    rec, _ = runner.run_stage(0, "update")
    assert rec.metrics["masked_rollouts"] == rewards.height and rec.metrics["optimizer_steps"] == 0


def test_advance_trains_past_the_last_commit_through_the_wrap_hook(demo_cfg):
    """What the Prefect flow relies on: every step goes through `wrap`, in order, and `advance` counts from
    the last committed iteration, whatever `run.iterations` says."""
    run = _run(demo_cfg)
    train(demo_cfg.with_overrides(iterations=1), run)
    calls = []

    def wrap(name, step):
        def wrapped(iteration):
            calls.append(f"{name}-iter-{iteration}")
            return step(iteration)

        return wrapped

    made = train(demo_cfg.with_overrides(iterations=1), run, wrap=wrap, advance=1)
    assert [m.iteration for m in made] == [1] and run.committed() == [0, 1]
    assert calls == [f"{s}-iter-1" for s in ("generate", "score", "aggregate", "update", "eval", "commit")]


def test_a_held_lease_stops_training_before_anything_is_written(demo_cfg):
    from rlme_pipeline.storage.lease import Lease, LeaseHeld

    run = _run(demo_cfg)
    with Lease(run.store, purpose="another trainer"):
        with pytest.raises(LeaseHeld, match="another trainer"):
            train(demo_cfg, run)
    assert [p for p in run.store.ls() if p != "lease"] == []
