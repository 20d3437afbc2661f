"""`rlme judge-check` (rlme_pipeline/judging/check.py) end to end on the tiny offline models.

The tiny policy is a random network: its completions are noise, so a label is right only where we plant
it. The module samples the demo prompts once, then writes a data file whose labels are the numbers some
samples happen to end with (for half the prompts) and the true answers elsewhere: judge-check re-draws the
same samples (same seeds), so both right and wrong samples exist. Every number is then recomputed here from
independent sources (the data file by prompt id, a second scoring pass, brute-force Mann-Whitney)."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import polars as pl
import pytest
import rlme_flows.cli
import yaml
from rlme_flows.cli import app
from typer.testing import CliRunner

from rlme_pipeline.algorithm.answers import extract_answer, normalize
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import load_config
from rlme_pipeline.judging import check
from rlme_pipeline.judging.judges import evaluators_at_start, score_rollouts
from tests.conftest import ROOT, demo_dict


def _write_config(tmp_path, mutate=None) -> str:
    d = demo_dict()
    d.pop("eval", None)
    d["run"]["storage"] = str(tmp_path / "runs")
    if mutate:
        mutate(d)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_models) -> dict:
    """A config whose data file labels some of the tiny policy's own samples right (see the docstring)."""
    tmp = tmp_path_factory.mktemp("judge-check")
    cfg = load_config(_write_config(tmp))
    prompts = check.check_inputs(cfg, 12, 4)
    with Backends() as b:
        rollouts, _ = check.sample(cfg, prompts, 4, b)
    said = {}  # prompt id -> a number one of its samples ends with
    for r in rollouts.sort("prompt_id", "sample_index").iter_rows(named=True):
        if (a := extract_answer(r["completion"], cfg.answer_format())) is not None:
            said.setdefault(r["prompt_id"], a)
    planted_ids = sorted(said)[::2]
    assert planted_ids, "no tiny-policy sample ends with a number: nothing to plant a right answer on"
    rows = [json.loads(line) for line in open(cfg.resolve(cfg.data.path))]
    for row in rows:
        if row["id"] in planted_ids:
            row["answer"] = said[row["id"]]
    data = tmp / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def labelled(d):
        d["data"]["path"] = str(data)
        d["questions"].append({"id": "wrong", "text": "Is the answer wrong?", "weight": -0.5})  # a penalising one

    return {"path": _write_config(tmp, labelled), "labels": {r["id"]: r["answer"] for r in rows}, "tmp": tmp}


def _brute_auroc(score, right) -> float | None:
    score, right = np.asarray(score, dtype=float), np.asarray(right, dtype=bool)
    if right.all() or not right.any():
        return None
    return float(np.mean([(x > y) + 0.5 * (x == y) for x in score[right] for y in score[~right]]))


@pytest.fixture(scope="module")
def checked(planted):
    cfg = load_config(planted["path"])
    with Backends() as b:
        result = check.run(cfg, check.check_inputs(cfg, 12, 4), 4, 1, b)
    return cfg, result


def test_right_and_wrong_come_from_each_samples_own_label(planted, checked):
    cfg, r = checked
    samples = r.samples.unique("rollout_id").sort("rollout_id")
    own = [
        extract_answer(c, cfg.answer_format()) == normalize(planted["labels"][p])
        for c, p in zip(samples["completion"], samples["prompt_id"])
    ]
    assert samples["correct"].to_list() == own
    assert 0 < sum(own) < len(own), "the planted labels should give right and wrong samples"
    assert r.summary["correct"] == sum(own) and r.summary["samples"] == len(own) == 12 * 4


def test_scores_belong_to_their_samples(checked):
    """A second, independent scoring pass over the samples' own texts gives each row's numbers."""
    cfg, r = checked
    texts = r.samples.unique("rollout_id").select("rollout_id", "iteration", "prompt", "completion")
    with Backends() as b:
        again = score_rollouts(texts, evaluators_at_start(cfg), cfg.questions, cfg.scoring, "again", b)
    key = ["rollout_id", "evaluator", "question_id"]
    both = r.samples.select(*key, "logp_yes").join(again.select(*key, logp_again="logp_yes"), on=key)
    assert both.height == r.samples.height == 12 * 4 * 2 * 3
    assert (both["logp_yes"] - both["logp_again"]).abs().max() < 1e-6


def test_each_auroc_ranks_the_score_it_names(checked):
    """auroc_reward ranks max(log P(yes), floor) (signed by the weight), auroc_p_yes the normalised P(yes):
    brute force from the raw log-probs, per evaluator x question, and for the summed reward."""
    cfg, r = checked
    floor = cfg.scoring.logp_floor
    differ = 0
    for cell in r.judges.iter_rows(named=True):
        rows = r.samples.filter(evaluator=cell["evaluator"], question_id=cell["question_id"])
        right = rows["correct"].to_numpy()
        reward = np.maximum(rows["logp_yes"].to_numpy(), floor) * np.sign(cell["weight"])
        p_yes = 1 / (1 + np.exp(rows["logp_no"].to_numpy() - rows["logp_yes"].to_numpy()))
        assert cell["auroc_reward"] == pytest.approx(_brute_auroc(reward, right), abs=1e-12)
        assert cell["auroc_p_yes"] == pytest.approx(_brute_auroc(p_yes, right), abs=1e-12)
        assert cell["p_yes_right"] == pytest.approx(p_yes[right].mean()) and cell["n"] == len(rows)
        differ += abs(_brute_auroc(reward, right) - _brute_auroc(p_yes, right)) > 1e-3
        assert cell["verdict"] == check.verdict(cell["auroc_reward"])
    assert differ, "every cell ranks the same under both scores: the test could not tell them apart"
    weights = {(e.name, q.id): e.weight * q.weight for e in cfg.evaluators for q in cfg.questions}
    total = (
        r.samples.with_columns(
            term=pl.max_horizontal("logp_yes", pl.lit(floor))
            * pl.struct("evaluator", "question_id").map_elements(
                lambda s: weights[(s["evaluator"], s["question_id"])], return_dtype=pl.Float64
            )
        )
        .group_by("rollout_id")
        .agg(pl.col("term").sum(), pl.col("correct").first())
    )
    assert r.summary["reward"]["auroc_reward"] == pytest.approx(_brute_auroc(total["term"], total["correct"]))
    n_right = int(total["correct"].sum())
    se = check.auroc_se(r.summary["reward"]["auroc_reward"], n_right, total.height - n_right)
    assert r.summary["reward"]["auroc_se"] == pytest.approx(se)


def test_calibration_error_by_hand(checked):
    _, r = checked
    for cell in r.judges.iter_rows(named=True):
        rows = r.samples.filter(evaluator=cell["evaluator"], question_id=cell["question_id"])
        p, right = rows["p_yes"].to_numpy(), rows["correct"].to_numpy()
        bins = np.clip(np.floor(p * 10), 0, 9)
        ece = sum((bins == b).sum() * abs(right[bins == b].mean() - p[bins == b].mean()) for b in set(bins)) / len(p)
        assert cell["ece"] == pytest.approx(ece, abs=1e-12)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, check.UNDETERMINED),
        (0.5, check.HACKED),
        (0.9499999, check.HACKED),
        (0.95, check.MARGINAL),
        (0.9799999, check.MARGINAL),
        (0.98, check.GOOD),
        (1.0, check.GOOD),
    ],
)
def test_verdict_thresholds_are_those_paper_mini_measured(value, expected):
    assert check.verdict(value) == expected


def test_auroc_standard_error_is_hanley_mcneil():
    """SE(A)^2 = (A(1-A) + (n_right-1)(Q1-A^2) + (n_wrong-1)(Q2-A^2)) / (n_right n_wrong), Q1 = A/(2-A),
    Q2 = 2A^2/(1+A): at A 0.9 with 20 right and 44 wrong, (0.09 + 19 x 0.0081818 + 43 x 0.0426316) / 880."""
    assert check.auroc_se(0.9, 20, 44) == pytest.approx(0.048601, abs=1e-6)
    assert check.auroc_se(0.97, 32, 32) == pytest.approx(0.0221, abs=1e-4)  # docs/judge_check.md's example
    assert check.auroc_se(None, 20, 44) is None and check.auroc_se(0.9, 0, 44) is None


def test_the_verdict_reads_the_rewards_auroc_not_p_yes(tiny_models, tmp_path):
    """The judge of the audit-vs-evolve confusion: more mass on " Yes" for right answers but even more on
    " No", so P(yes) normalised ranks them last (AUROC 0) while the reward ranks them first (AUROC 1)."""
    cfg = load_config(_write_config(tmp_path))
    ids = [f"r{i}" for i in range(4)]
    right = [True, True, False, False]
    graded = pl.DataFrame(
        {"rollout_id": ids, "prompt_id": ids, "sample_index": [0] * 4, "iteration": [0] * 4, "prompt": ["q"] * 4,
         "completion": ["c"] * 4, "label": ["1"] * 4, "correct": right}
    )  # fmt: skip
    logp_yes, logp_no = [-0.5, -0.6, -3.0, -2.0], [-0.1, -0.2, -6.0, -5.0]
    scores = pl.concat(
        pl.DataFrame(
            {"rollout_id": ids, "iteration": [0] * 4, "scoreset": ["x"] * 4, "evaluator": [e.name] * 4,
             "question_id": [q.id] * 4, "logp_yes": logp_yes, "logp_no": logp_no,
             "p_yes": [1 / (1 + np.exp(n - y)) for y, n in zip(logp_yes, logp_no)], "status": ["ok"] * 4}
        )
        for e in cfg.evaluators
        for q in cfg.questions
    )  # fmt: skip
    r = check.measure(cfg, graded, scores, pl.DataFrame())
    assert set(r.judges["auroc_reward"]) == {1.0} and set(r.judges["auroc_p_yes"]) == {0.0}
    assert set(r.judges["verdict"]) == {check.GOOD} and r.summary["verdict"] == check.GOOD


# --- the command ---------------------------------------------------------------------------------------
@pytest.fixture
def no_models_no_prefect(monkeypatch):
    """A user error must be reported before any model loads and before Prefect starts."""
    from transformers import AutoModelForCausalLM

    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))

    @contextmanager
    def refuse():
        raise AssertionError("Prefect was started for a user error")
        yield  # pragma: no cover

    monkeypatch.setattr(rlme_flows.cli, "local_prefect", refuse)
    return loaded


def _no_labels(d):
    d["data"]["label_column"] = None


def _empty_labels(d, tmp_path):
    rows = [json.loads(line) for line in open(d["data"]["path"])]
    p = tmp_path / "unlabelled.jsonl"
    p.write_text("".join(json.dumps({**r, "answer": None if i % 2 else ""}) + "\n" for i, r in enumerate(rows)))
    d["data"]["path"] = str(p)


def _no_evaluators(d):
    d["evaluators"] = []
    d["label_reward"] = {"share": 1.0}


BAD = {
    "no label column": (_no_labels, [], "data.label_column: not set; judge-check grades"),
    "no labelled prompts": (None, [], "data.label_column: column 'answer' of "),
    "no evaluators": (_no_evaluators, [], "evaluators: none configured"),
    "out inside the run": (None, ["--out", "{runs}/demo/judge"], "is inside the run"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_model_loads(case, tmp_path, tiny_models, no_models_no_prefect):
    mutate, extra, expected = BAD[case]
    if case == "no labelled prompts":
        mutate = lambda d: _empty_labels(d, tmp_path)  # noqa: E731
    path = _write_config(tmp_path, mutate)
    args = ["judge-check", path, *[a.format(runs=tmp_path / "runs") for a in extra]]
    r = CliRunner().invoke(app, args, terminal_width=200)
    out = r.stdout.strip()  # stderr may carry the data set's first-read progress bar
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}{r.exception!r}"
    assert out.startswith("error: ") and "\n" not in out and expected in out, out
    assert not no_models_no_prefect, "a model was loaded before the input was checked"


def test_the_command_prints_and_writes_the_report(planted, checked, tmp_path):
    """The installed command, in its own process (the flow on Prefect's temporary server)."""
    out = tmp_path / "check"
    args = ["judge-check", planted["path"], "--prompts", "12", "--samples", "4", "--probe-prompts", "1", "--json",
            "--out", str(out)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "rlme_flows.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{\n") :])
    assert report["verdict"] == checked[1].summary["verdict"] and report["correct"] == checked[1].summary["correct"]
    assert report["reward"]["auroc_reward"] == pytest.approx(checked[1].summary["reward"]["auroc_reward"])
    written = json.loads((out / "judge_check.json").read_text())
    assert written["judges"] == report["judges"] and sorted(p.name for p in out.iterdir()) == [
        "judge_check.json", "judges.parquet", "probe.parquet", "reliability.parquet", "samples.parquet"
    ]  # fmt: skip
    assert pl.read_parquet(out / "samples.parquet").height == 12 * 4 * 2 * 3
    assert not (tmp_path / "runs").exists()  # nothing written for a run
