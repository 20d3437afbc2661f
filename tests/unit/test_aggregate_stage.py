"""The aggregate stage: the pure function (stages/aggregate.py) computes the rewards and the numbers a
user watches (reward mean/std over unmasked rollouts, masked count, per evaluator x question drift, label
share); run through the runner on a local run, it reads the iteration's rollouts and scores, writes the
rewards table under an attempt-unique name and records those numbers in its stage record."""

from __future__ import annotations

import math
import time

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rlme_pipeline.algorithm.rewards import compute_rewards
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import validate_config
from rlme_pipeline.jobs.train import Runner
from rlme_pipeline.stages.aggregate import aggregate, component_metrics, judges_reward
from rlme_pipeline.storage.run import Run, StageRecord
from rlme_pipeline.storage.store import Store

FLOOR = -20.0
IDS = ["a", "b", "c", "d"]
BASE = {
    "data": {"path": "x.jsonl", "label_column": "answer"},
    "policy": {"model": "tiny:policy"},
    "evaluators": [{"name": "e", "model": "tiny:evaluator"}, {"name": "f", "model": "tiny:evaluator", "weight": 0.5}],
    "questions": [{"id": "k", "text": "Good?"}],
    "scoring": {"logp_floor": FLOOR},
}


def _rollouts() -> pl.DataFrame:
    n = len(IDS)
    return pl.DataFrame(
        {
            "run_id": ["r"] * n,
            "iteration": [2] * n,
            "rollout_id": IDS,
            "prompt_id": ["p", "p", "p", "q"],
            "sample_index": list(range(n)),
            "prompt": ["2+3?"] * n,
            "completion": [" The answer is 5.", " The answer is 6.", " The answer is 5.", " The answer is 1."],
            "prompt_token_ids": [[1, 2]] * n,
            "completion_token_ids": [[3]] * n,
            "behavior_logprobs": [[-0.5]] * n,
            "finish_reason": ["stop"] * n,
            "label": ["5", "5", "5", "1"],
            "policy_version": ["v"] * n,
        }
    )


def _scores() -> pl.DataFrame:
    #        rollout  e: log P(yes)   f: log P(yes) (None: failed)
    table = {"a": (-1.0, -2.0), "b": (-3.0, -40.0), "c": (-2.0, None), "d": (-0.5, -0.5)}
    rows = [(rid, ev, ly) for rid, pair in table.items() for ev, ly in zip("ef", pair)]
    return pl.DataFrame(
        {
            "rollout_id": [r[0] for r in rows],
            "iteration": [2] * len(rows),
            "scoreset": ["train"] * len(rows),
            "evaluator": [r[1] for r in rows],
            "question_id": ["k"] * len(rows),
            "logp_yes": [r[2] for r in rows],
            "logp_no": [None if r[2] is None else -1.0 for r in rows],
            "p_yes": [None if r[2] is None else (0.25 if r[1] == "e" else 0.75) for r in rows],
            "status": ["ok" if r[2] is not None else "nonfinite" for r in rows],
            "evaluator_version": ["v"] * len(rows),
            "question_sha": ["s"] * len(rows),
        },
        schema_overrides={"logp_yes": pl.Float64, "logp_no": pl.Float64, "p_yes": pl.Float64},
    )


def _run(tmp_path) -> Run:
    run = Run(Store(str(tmp_path / "runs")), "r")
    for stage, name, df, table in (
        ("generate", "rollouts.parquet", _rollouts(), "rollouts"),
        ("score", "scores.parquet", _scores(), "scores"),
    ):
        run.write_stage_record(
            StageRecord(stage=stage, iteration=2, files=[run.write_table(2, name, df, table)], seconds=0.0)
        )
    return run


def test_the_stage_writes_the_rewards_and_records_its_metrics(tmp_path):
    run, cfg = _run(tmp_path), validate_config(BASE)
    with Backends() as backends:
        runner = Runner(cfg, run, backends)
        t0 = time.perf_counter()
        rec, ran = runner.run_stage(2, "aggregate")
        assert 0 <= rec.seconds <= time.perf_counter() - t0  # its own duration, within the call's
        assert ran and run.stage_record(2, "aggregate") == rec  # the record is written, its files intact
        assert runner.run_stage(2, "aggregate") == (rec, False)  # so the stage is not run again
    assert (rec.stage, rec.iteration, [f.logical for f in rec.files]) == (
        "aggregate",
        2,
        ["iter-000002/rewards.parquet"],
    )
    assert rec.files[0].path != rec.files[0].logical  # an attempt-unique physical name
    want = compute_rewards(_scores(), _rollouts(), {"e": 1.0, "f": 0.5}, {"k": 1.0}, form="logp", floor=FLOOR)
    got = run.store.read_parquet(rec.files[0].path)
    assert_frame_equal(got, want, check_dtypes=False)
    # a: -1 + 0.5 * -2 = -2; b: -3 + 0.5 * -20 (floored) = -13; c: failed -> NaN; d: -0.5 - 0.25 = -0.75
    assert got["reward"].to_list()[:2] == [-2.0, -13.0] and math.isnan(got["reward"][2])
    assert run.read_table(2, "rewards.parquet").equals(got)  # readers find it by its logical name
    rewards = [-2.0, -13.0, -0.75]
    mean = sum(rewards) / 3
    m = rec.metrics
    assert m["reward_mean"] == pytest.approx(mean) and m["masked_rollouts"] == 1
    assert m["reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3))
    assert m["e/k/mean"] == pytest.approx((-1.0 - 3.0 - 2.0 - 0.5) / 4) and m["e/k/p_yes"] == 0.25
    assert m["f/k/mean"] == pytest.approx((-2.0 - 20.0 - 0.5) / 3) and m["f/k/p_yes"] == 0.75  # failed row left out
    assert "label_rewarded_share" not in m


def test_component_metrics_are_unweighted_per_evaluator_and_question():
    cfg = validate_config(BASE)
    m = component_metrics(cfg, _scores())
    assert list(m) == ["e/k/mean", "e/k/std", "e/k/p_yes", "f/k/mean", "f/k/std", "f/k/p_yes"]
    e = [-1.0, -3.0, -2.0, -0.5]
    e_mean = sum(e) / 4
    assert m["e/k/std"] == pytest.approx(math.sqrt(sum((x - e_mean) ** 2 for x in e) / 4))  # population std
    assert m["f/k/std"] == pytest.approx(math.sqrt(sum((x - (-22.5 / 3)) ** 2 for x in (-2.0, -20.0, -0.5)) / 3))
    p = component_metrics(validate_config({**BASE, "scoring": {"reward_form": "p", "logp_floor": FLOOR}}), _scores())
    assert p["e/k/mean"] == pytest.approx(sum(math.exp(x) for x in e) / 4)


def test_the_stage_mixes_label_rewards_when_configured():
    got, metrics = aggregate(validate_config({**BASE, "label_reward": {"share": 1.0}}), _scores(), _rollouts())
    assert got["reward"].to_list() == [0.0, FLOOR, 0.0, 0.0]  # exact match replaces every labelled reward
    assert metrics["label_rewarded_share"] == 1.0 and metrics["masked_rollouts"] == 0


def test_component_metrics_are_listed_by_evaluator_then_question():
    rows = [(ev, q) for ev in ("zeta", "alpha") for q in ("q3", "q1", "q2")]
    scores = pl.DataFrame(
        {
            "evaluator": [r[0] for r in rows],
            "question_id": [r[1] for r in rows],
            "logp_yes": [-1.0] * 6,
            "p_yes": [0.5] * 6,
            "status": ["ok"] * 6,
        }
    )
    keys = list(component_metrics(validate_config(BASE), scores))
    assert keys[::3] == [f"{ev}/{q}/mean" for ev in ("alpha", "zeta") for q in ("q1", "q2", "q3")]


def test_label_mixing_in_the_stage_uses_the_reward_form_and_std_switch():
    cfg = validate_config(
        {
            **BASE,
            "label_reward": {"share": 1.0},
            "algorithm": {"scale_advantage_std": True},
            "scoring": {"logp_floor": FLOOR, "reward_form": "p"},
        }
    )
    got, _ = aggregate(cfg, _scores(), _rollouts())
    assert got["reward"].to_list() == [1.0, 0.0, 1.0, 1.0]  # p form: 1 right, 0 wrong
    # group p: rewards 1, 0, 1 -> mean 2/3, population std sqrt(2)/3; group q: one rollout -> 0
    std = math.sqrt(2) / 3
    assert got["advantage"].to_list() == pytest.approx(
        [(1 / 3) / (std + 1e-6), (-2 / 3) / (std + 1e-6), (1 / 3) / (std + 1e-6), 0.0]
    )


def test_judges_reward_leaves_out_the_label_mix_and_scales_only_when_asked():
    # what eval, judge-check and evolve rank by: the judges alone, with plain group-centred advantages unless
    # the caller passes scale_std, whatever the training config says about either
    cfg = validate_config({**BASE, "label_reward": {"share": 1.0}, "algorithm": {"scale_advantage_std": True}})
    weights = ({"e": 1.0, "f": 0.5}, {"k": 1.0})
    got = judges_reward(cfg, _scores(), _rollouts())
    assert_frame_equal(got, compute_rewards(_scores(), _rollouts(), *weights, form="logp", floor=FLOOR))
    # group p: a -2, b -13 (c failed: NaN) -> mean -7.5; group q: d alone -> 0
    assert got["advantage"].to_list()[:2] == [5.5, -5.5] and got["advantage"][3] == 0.0
    scaled = judges_reward(cfg, _scores(), _rollouts(), scale_std=True)
    assert_frame_equal(
        scaled, compute_rewards(_scores(), _rollouts(), *weights, form="logp", floor=FLOOR, scale_std=True)
    )
    assert scaled["advantage"][0] == pytest.approx(5.5 / (5.5 + 1e-6))
