"""Held-out evaluation (config eval) for real: tiny models train with eval on; the eval is committed with
its iteration and shows in the manifest, `rlme status` (--json and 80 columns), TensorBoard and the audit;
a resumed run skips a committed eval and ends byte-identical to an uninterrupted one; eval off changes
nothing training computes or records."""

from __future__ import annotations

import io

import polars as pl
import pytest
from rich.console import Console
from rlme_flows.status import collect, render

from rlme_pipeline.algorithm.answers import is_correct, majority, reference_answer, same_answer
from rlme_pipeline.audit.page import render as render_audit
from rlme_pipeline.audit.report import compute
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import load_config
from rlme_pipeline.jobs.train import Runner, train
from rlme_pipeline.steps import EVAL, steps_of
from rlme_pipeline.storage.run import EVAL_FILE, Run
from tests.conftest import ROOT, demo_variant, write_config

HELDOUT = ROOT / "data" / "demo_heldout.jsonl"
PROMPTS = 4
SAMPLES = 2  # eval.samples: pass@2 and maj@2 beside the greedy completion


def _config(tmp_path, name: str, eval_on: bool = True, tracking: bool = False):
    """The demo made small (2 prompts x 2 samples, 1 judge, 1 question, no probe), 2 iterations."""
    ev = {"every": 1, "path": str(HELDOUT), "prompts": PROMPTS, "samples": SAMPLES} if eval_on else None
    tb = {"backends": ["tensorboard"], "dir": str(tmp_path / "tracking"), "samples": 0} if tracking else None
    d = demo_variant(tmp_path / name, iterations=2, run_id="ev", micro=True, probe=None, eval=ev, tracking=tb)
    return load_config(write_config(d, tmp_path, name))


def _contents(run: Run) -> dict[str, str]:
    return {f.logical: f.sha256 for i in run.committed() for f in run.manifest(i).files}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_models):
    """An uninterrupted 2-iteration run with eval every iteration and TensorBoard on."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = _config(tmp, "a", tracking=True)
    run = Run.for_config(cfg)
    return cfg, run, train(cfg, run), tmp


def test_eval_is_committed_with_its_iteration(evaluated):
    cfg, run, manifests, _ = evaluated
    for m in manifests:
        i = m.iteration
        assert f"{run.unit(i).rel(EVAL_FILE)}" in {f.logical for f in m.files}
        table = run.read_table(i, EVAL_FILE)
        rows = PROMPTS * (1 + SAMPLES)
        assert table.height == rows and table["iteration"].to_list() == [i] * rows
        assert table["sample_index"].to_list() == list(range(1 + SAMPLES)) * PROMPTS
        # the policy this iteration's update produced, not the one that generated its rollouts
        assert m.lineage["eval"]["policy_version"] == m.lineage["policy_after"] != m.lineage["policy_before"]
        assert (table["policy_version"] == m.lineage["policy_after"]).all()
        # accuracy: exact match of each stored greedy completion with its label, recomputed here
        fmt = cfg.answer_format()
        one = table.filter(pl.col("sample_index") == 0)
        correct = [is_correct(c, lab, fmt) for c, lab in zip(one["completion"], one["label"])]
        assert m.metrics["eval/accuracy"] == pytest.approx(sum(correct) / PROMPTS)
        assert m.metrics["eval/labelled"] == PROMPTS
        # pass@k and maj@k from the stored samples; the samples are drawn, not k copies of the greedy one
        samples = table.filter(pl.col("sample_index") > 0).group_by("prompt_id", maintain_order=True)
        passed = [any(is_correct(c, g["label"][0], fmt) for c in g["completion"]) for _, g in samples]
        voted = [same_answer(majority(g["answer"].to_list(), fmt), reference_answer(g["label"][0], fmt), fmt) for _, g in samples]  # fmt: skip
        assert m.metrics["eval/pass_at_k"] == pytest.approx(sum(passed) / PROMPTS)
        assert m.metrics["eval/maj_at_k"] == pytest.approx(sum(voted) / PROMPTS)
        assert m.metrics["eval/samples"] == SAMPLES
        assert any(g["completion"].n_unique() > 1 for _, g in samples)  # sampled, not k greedy copies
        # the judges' reward is of the greedy completions; the samples are not judged
        assert m.metrics["eval/reward_mean"] == pytest.approx(one["reward"].mean())
        assert table.filter(pl.col("sample_index") > 0)["reward"].is_null().all()
        assert m.metrics["eval/failed_share"] == 0.0 and "eval" in m.timings


def test_eval_shows_in_status_json_and_at_80_columns(evaluated):
    _, run, manifests, _ = evaluated
    data = collect(run)
    for row, m in zip(data["committed"], manifests):
        assert row["metrics"]["eval/accuracy"] == m.metrics["eval/accuracy"]
        assert row["metrics"]["eval/reward_mean"] == m.metrics["eval/reward_mean"]
    console = Console(width=80, file=io.StringIO(), color_system=None)
    render(data, console)
    text = console.file.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("iter"))
    assert "eval acc" in header and "eval rew" in header
    row0 = next(line for line in text.splitlines() if line.split()[:1] == ["0"])
    assert f"{manifests[0].metrics['eval/accuracy']:.1%}" in row0


def test_eval_reaches_the_tracker(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, manifests, tmp = evaluated
    acc = EventAccumulator(str(tmp / "tracking" / "tensorboard" / cfg.run.id), size_guidance={"scalars": 0}).Reload()
    for key in ("eval/accuracy", "eval/reward_mean", "eval/pass_at_k", "eval/maj_at_k"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx({m.iteration: m.metrics[key] for m in manifests}, rel=1e-6), key


def test_eval_curve_in_the_audit(evaluated):
    _, run, manifests, _ = evaluated
    tables = compute(run, probe_prompts=0)
    ev = tables["eval"]
    assert ev["iteration"].to_list() == [0, 1]
    assert ev["accuracy"].to_list() == [m.metrics["eval/accuracy"] for m in manifests]
    assert ev["pass_at_k"].to_list() == [m.metrics["eval/pass_at_k"] for m in manifests]
    assert ev["samples"].to_list() == [SAMPLES, SAMPLES]
    assert ev["reward_mean"].to_list() == pytest.approx([m.metrics["eval/reward_mean"] for m in manifests])
    html = render_audit(run.url, "train", tables)
    assert 'data-plot="eval"' in html and "Held-out evaluation" in html and "held-out accuracy" in html


def test_resume_skips_a_committed_eval_and_matches_the_uninterrupted_run(evaluated, tmp_path):
    """Interrupted twice, as separate processes would be (a fresh Backends each: nothing in memory):
    after iteration 0's eval was recorded, and after iteration 1's update, before its eval."""
    _, ref, _, _ = evaluated
    cfg = _config(tmp_path, "b")
    run = Run.for_config(cfg)
    run.open(cfg)
    with Backends() as b:
        for stage in steps_of(cfg, 0):
            Runner(cfg, run, b).run_stage(0, stage)
    recorded = run.read_record(0, EVAL).files
    with Backends() as b:
        for stage in steps_of(cfg, 1)[:-1]:  # all but the eval
            Runner(cfg, run, b).run_stage(1, stage)
    made = train(cfg, run)
    assert [m.iteration for m in made] == [0, 1]
    eval0 = [f for f in made[0].files if f.logical.endswith(EVAL_FILE)]
    assert eval0 == recorded, "the committed eval record was not reused: the eval ran again"
    assert _contents(run) == _contents(ref)  # the eval after a reload included, byte for byte
    for i in (0, 1):
        assert run.read_table(i, EVAL_FILE).equals(ref.read_table(i, EVAL_FILE))


def test_eval_off_changes_nothing_training_records(evaluated, tmp_path):
    on_cfg, on, on_manifests, _ = evaluated
    cfg = _config(tmp_path, "c", eval_on=False)
    assert cfg.hash() == on_cfg.hash()  # observation only: the same experiment
    run = Run.for_config(cfg)
    manifests = train(cfg, run)
    off_files = _contents(run)
    assert off_files == {k: v for k, v in _contents(on).items() if not k.endswith(EVAL_FILE)}
    for m, m_on in zip(manifests, on_manifests):
        assert not any(k.startswith("eval/") for k in m.metrics) and "eval" not in m.timings
        assert "eval" not in m.lineage and not run.store.exists(run.unit(m.iteration).record_rel(EVAL))
        assert m.metrics == {k: v for k, v in m_on.metrics.items() if not k.startswith("eval/")}
        assert set(m.model_dump()) == set(m_on.model_dump())
