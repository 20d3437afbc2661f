"""The audit's numbers against direct polars computations, the HTML's plots, and the hacking probe."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlme_pipeline import scoreset
from rlme_pipeline.audit import labels
from rlme_pipeline.audit.sources import Scoreset
from rlme_pipeline.config import ProbeConfig, QuestionConfig, ScoringConfig
from rlme_pipeline.jobs.audit import audit
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.jobs.train import train
from rlme_pipeline.judging.judges import Evaluator
from rlme_pipeline.judging.probe import PROBES, probe_metrics, run_probe
from rlme_pipeline.models.loading import weights_version
from rlme_pipeline.models.weights_at import ModelRef
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store
from tests.conftest import trained_demo


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_models):
    """A two-iteration run, a re-score of it, and the audit comparing both (built once for the module)."""
    root = tmp_path_factory.mktemp("audit")
    run = trained_demo(root, iterations=2)
    qs = [QuestionConfig(id="short", text="Is it short?", weight=-1.0), QuestionConfig(id="right", text="Is it right?")]
    rescore(run, "v2", questions=qs, shard_rows=16)
    out = Store(str(root / "audit"))
    digest = audit(run, out, "v2", compare_to="train", probe_prompts=1)
    return run, out, digest


def test_audit_tables_match_direct_polars(audited):
    run, out, digest = audited
    scores = pl.concat([scoreset.read_table(run, "v2", i, "scores.parquet") for i in run.committed()])
    summary = pl.read_parquet(f"{out.root}/summary.parquet")
    assert summary.height == 2 * 2 * 2  # iterations x evaluators x questions
    for r in summary.iter_rows(named=True):
        cell = scores.filter(iteration=r["iteration"], evaluator=r["evaluator"], question_id=r["question_id"])
        assert r["n"] == cell.height and r["n_failed"] == 0
        assert r["p_yes_mean"] == pytest.approx(cell["p_yes"].mean(), rel=1e-12)
        assert r["p_yes_std"] == pytest.approx(float(np.std(cell["p_yes"].to_numpy())), rel=1e-9)
        assert r["p_yes_q50"] == pytest.approx(float(np.quantile(cell["p_yes"].to_numpy(), 0.5)), rel=1e-9)
        f = np.maximum(cell["logp_yes"].to_numpy(), run.config().scoring.logp_floor)  # reward_form logp
        assert r["f_mean"] == pytest.approx(float(f.mean()), rel=1e-9)
        assert r["f_q90"] == pytest.approx(float(np.quantile(f, 0.9)), rel=1e-9)

    corr = pl.read_parquet(f"{out.root}/correlations.parquet")
    for r in corr.iter_rows(named=True):
        w = scores.filter(evaluator=r["evaluator"]).pivot(on="question_id", index="rollout_id", values="p_yes")
        assert r["pearson"] == pytest.approx(float(np.corrcoef(w[r["question_a"]], w[r["question_b"]])[0, 1]), rel=1e-6)
    agree = pl.read_parquet(f"{out.root}/agreement.parquet")
    for r in agree.iter_rows(named=True):
        w = scores.filter(question_id=r["question_id"]).pivot(on="evaluator", index="rollout_id", values="p_yes")
        assert r["agreement"] == pytest.approx(
            float(((w[r["evaluator_a"]] > 0.5) == (w[r["evaluator_b"]] > 0.5)).mean())
        )

    a = pl.concat([scoreset.read_table(run, "v2", i, "rewards.parquet") for i in run.committed()])
    b = pl.concat([run.read_table(i, "rewards.parquet") for i in run.committed()])
    j = a.join(b, on="rollout_id", suffix="_b")
    cmp = pl.read_parquet(f"{out.root}/compare.parquet")
    for r in cmp.iter_rows(named=True):
        ji = j.filter(iteration=r["iteration"])
        assert r["reward_diff_mean"] == pytest.approx((ji["reward_b"] - ji["reward"]).mean(), rel=1e-9)
        flips = [np.sign(x) != np.sign(y) for x, y in zip(ji["advantage"], ji["advantage_b"]) if x != 0 and y != 0]
        assert r["sign_change_share"] == pytest.approx(float(np.mean(flips)))
    totals = pl.read_parquet(f"{out.root}/totals.parquet")
    for name, rewards in (("v2", a), ("train", b)):
        t = totals.filter(scoreset=name).sort("iteration")
        assert t["iteration"].to_list() == run.committed()
        for r in t.iter_rows(named=True):
            x = rewards.filter(iteration=r["iteration"])["reward"].to_numpy()
            assert r["n"] == len(x) and r["n_masked"] == int(np.isnan(x).sum())
            x = x[~np.isnan(x)]
            assert r["reward_mean"] == pytest.approx(float(x.mean()), rel=1e-9)
            assert r["reward_std"] == pytest.approx(float(x.std()), rel=1e-9)
            assert r["reward_q90"] == pytest.approx(float(np.quantile(x, 0.9)), rel=1e-9)
    changed = pl.read_parquet(f"{out.root}/changed.parquet")
    assert changed.height == 20 and changed["completion"].null_count() == 0
    top = j.with_columns(d=(pl.col("advantage_b") - pl.col("advantage")).abs()).sort("d", descending=True)
    assert changed["rollout_id"][0] == top["rollout_id"][0]


class _Report(HTMLParser):
    """Per figure (data-plot): its panels, tick marks and legends, as matplotlib names them in the SVG;
    plus table headers, section titles and anything the page would fetch."""

    def __init__(self):
        super().__init__()
        self.figures, self.headers, self.titles, self.external = {}, [], [], []
        self._fig, self._in = None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self._fig = self.figures.setdefault(a["data-plot"], {"axes": 0, "xticks": 0, "yticks": 0, "legends": 0})
        gid = a.get("id") or ""
        if self._fig is not None and tag == "g":
            for prefix, key in (("axes_", "axes"), ("xtick_", "xticks"), ("ytick_", "yticks"), ("legend_", "legends")):
                self._fig[key] += gid.startswith(prefix)
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith("#"):
                self.external.append(a[k])
        self._in = tag if tag in ("th", "h2") else None
        self._text = ""

    def handle_data(self, data):
        if self._in:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "figure":
            self._fig = None
        if tag == self._in:
            (self.headers if tag == "th" else self.titles).append(self._text)
            self._in = None


def test_html_report_has_real_charts_and_named_columns(audited):
    run, out, _ = audited
    p = _Report()
    p.feed(open(out.root + "/report.html", encoding="utf-8").read())
    f = p.figures
    assert set(f) == {"reward-total", "reward-components", "distribution", "calibration", "probe", "eval"}
    assert f["reward-total"]["axes"] == 2  # v2 and train, each on its own scale
    assert f["eval"]["axes"] == 2  # the demo's held-out eval: accuracy and the judges' reward
    assert f["reward-components"]["axes"] == 2  # one panel per evaluator, a line per question
    assert f["distribution"]["axes"] == 4  # evaluator x question
    for kind in ("reward-total", "reward-components", "calibration", "probe"):
        assert f[kind]["legends"] == f[kind]["axes"], kind
    for kind, fig in f.items():  # real axes: the value axis has ticks between min and max, not just both ends
        value_axis = "xticks" if kind == "probe" else "yticks"  # the probe's bars are horizontal
        assert fig[value_axis] >= 4 * fig["axes"] and fig["xticks"] >= 2 * fig["axes"], (kind, fig)
    assert {"reward v2", "reward train", "Δ reward (train − v2)"} <= set(p.headers)
    assert not {"reward_a", "reward_b", "advantage_a", "advantage_b"} & set(p.headers)
    assert any("master keys" in t for t in p.titles) and "Total reward per iteration" in p.titles
    assert p.external == []  # nothing to fetch: opens offline


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(request, tmp_path):
    """The page as a browser draws it: a screenshot that is not blank, and nothing on the console."""
    exe = _chromium()
    if exe is None:
        msg = (
            "chromium is not installed (Debian: apt-get install -y chromium); the report was not rendered in a browser"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI={os.environ['CI']}: {msg}")
        pytest.skip(f"SKIPPED, NOT PASSED: {msg}")
    run, out, _ = request.getfixturevalue("audited")
    png = tmp_path / "report.png"
    proc = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2400",
            f"--screenshot={png}",
            "--enable-logging=stderr",
            "--v=0",
            Path(out.root, "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]  # console.* and uncaught errors
    assert console == [], console
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.shape == (2400, 1280)
    assert img.std() > 20 and (img < 200).mean() > 0.02  # text, axes and bands drawn, not a blank page


def _brute_auroc(score: np.ndarray, correct: np.ndarray) -> float:
    pos, neg = score[correct], score[~correct]
    return float(np.mean([(x > y) + 0.5 * (x == y) for x in pos for y in neg]))


def test_label_metrics_match_brute_force():
    """Both AUROCs by hand. P(yes) and P(no) are drawn apart, so the reward (max(log P(yes), floor)) and
    p_yes (P(yes) normalised over the yes/no mass) rank the rollouts differently; the penalising question
    (weight -0.5) enters the reward with its sign."""
    rng = np.random.default_rng(0)
    n = 60
    labels_ = [str(int(x)) for x in rng.integers(0, 5, n)]
    completions = [f"The answer is {int(x)}." for x in rng.integers(0, 5, n)]
    rollouts = pl.DataFrame(
        {
            "rollout_id": [f"r{i}" for i in range(n)],
            "iteration": [0] * n,
            "prompt_id": [f"p{i // 4}" for i in range(n)],
            "prompt": ["q"] * n,
            "completion": completions,
            "label": labels_,
        }
    )
    correct = np.array([c.split()[-1].rstrip(".") == lab for c, lab in zip(completions, labels_)])
    # A judge that puts more mass on " Yes" for right answers but even more on " No": the reward ranks them
    # up, p_yes down (the audit's AUROC 0.4 against evolve's 0.9 for the same judgements)
    logp_yes = np.round(np.where(correct, np.log(rng.uniform(0.02, 0.5, n)), np.log(rng.uniform(1e-8, 0.1, n))), 1)
    logp_yes[:3] = -30.0  # under the floor: tied at it in the reward, not in p_yes
    logp_no = logp_yes + np.where(correct, 1.0, -1.0) + rng.normal(0, 0.7, n)
    p = 1 / (1 + np.exp(logp_no - logp_yes))
    scores = pl.concat(
        pl.DataFrame(
            {
                "rollout_id": rollouts["rollout_id"],
                "evaluator": ["e"] * n,
                "question_id": [q] * n,
                "logp_yes": logp_yes,
                "logp_no": logp_no,
                "p_yes": p,
                "status": ["ok"] * n,
            }
        )
        for q in ("q", "wrong")
    )
    ss = Scoreset(
        "x",
        scores.lazy(),
        pl.LazyFrame(),
        rollouts.lazy(),
        {"e": 1.0},
        {"q": 1.0, "wrong": -0.5},
        {"q": "?", "wrong": "Is it wrong?"},
        "logp",
        -13.8,
        None,
        "auto",
    )
    m = {r["question_id"]: r for r in labels.label_metrics(ss).iter_rows(named=True)}
    reward = np.maximum(logp_yes, -13.8)
    assert m["q"]["n_correct"] == correct.sum() and 0 < correct.sum() < n
    assert m["q"]["auroc_reward"] == pytest.approx(_brute_auroc(reward, correct), rel=1e-12)
    assert m["q"]["auroc_p_yes"] == pytest.approx(_brute_auroc(p, correct), rel=1e-12)
    assert m["q"]["auroc_reward"] > 0.7 and m["q"]["auroc_p_yes"] < 0.3  # they rank different scores
    assert m["q"]["auroc"] == m["q"]["auroc_p_yes"]  # the old column, for old readers
    assert m["wrong"]["auroc_reward"] == pytest.approx(_brute_auroc(-reward, correct), rel=1e-12)
    assert m["wrong"]["auroc_p_yes"] == m["q"]["auroc_p_yes"]
    assert m["q"]["accuracy_at_0_5"] == pytest.approx(float(((p > 0.5) == correct).mean()))


def _forced(src, dst, token: str):
    """A copy of the tiny evaluator that answers `token` to everything: a huge constant in the residual
    stream (last attention output bias) makes the final hidden state the same direction for every input,
    and the lm_head maps that direction to `token` only."""
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    cfg = model.config
    cfg.attention_bias = True
    forced = AutoModelForCausalLM.from_config(cfg)
    forced.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for layer in forced.model.layers:
            layer.self_attn.q_proj.bias.zero_()
            layer.self_attn.k_proj.bias.zero_()
            layer.self_attn.v_proj.bias.zero_()
            layer.self_attn.o_proj.bias.zero_()
        forced.model.layers[-1].self_attn.o_proj.bias[0] = 1e4
        forced.lm_head.weight.zero_()
        forced.lm_head.weight[tok.convert_tokens_to_ids(tok.tokenize(token))[0], 0] = 5.0
    forced.save_pretrained(dst)
    tok.save_pretrained(dst)
    return str(dst)


def test_probe_flags_an_evaluator_that_always_says_yes(tiny_models, tmp_path, backends):
    yes = _forced(tiny_models["evaluator"], tmp_path / "yes", " Yes")
    no = _forced(tiny_models["evaluator"], tmp_path / "no", " No")
    judges = [
        Evaluator(n, ModelRef(p, weights_version(p), "float32", "cpu")) for n, p in (("yes-man", yes), ("skeptic", no))
    ]
    qs = [
        QuestionConfig(id="correct", text="Is the answer correct?"),
        QuestionConfig(id="logic", text="Is it logical?"),
    ]
    prompts = pl.DataFrame({"prompt_id": ["a", "b"], "prompt": ["What is 2+3?", "What is 11-5?"]})
    table = run_probe(judges, qs, ScoringConfig(), prompts, 0, backends)
    assert table["n"].sum() == 2 * 2 * 2 * len(PROBES)
    m = probe_metrics(table, alarm_share=0.5)
    assert m["probe/yes-man/share"] == 1.0 and m["probe/skeptic/share"] == 0.0
    assert m["probe/alarm"] == 1.0


def test_training_records_the_probe_without_changing_the_run_hash(demo_cfg):
    cfg = demo_cfg.with_overrides(iterations=1)
    probed = cfg.model_copy(update={"probe": ProbeConfig(every=1, prompts=1, alarm_share=0.99)})
    assert probed.hash() == cfg.hash()
    run = Run(Store(cfg.run.storage), cfg.run.id)
    train(probed, run)
    metrics = run.manifest(0).metrics
    assert {"probe/other/share", "probe/self0/share", "probe/share_max", "probe/alarm"} <= set(metrics)
    assert 0.0 <= metrics["probe/share_max"] <= 1.0


def test_label_metrics_read_the_run_answer_format():
    """Correct is what the run's answer format says: GSM8K labels and #### answers under gsm8k; under
    answer_is only the answer stated after "The answer is" counts."""
    label = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    completions = ["#### 72", "The answer is 72.", "#### 24", "The answer is 24.", "So 72 clips.\n#### 72"]
    rollouts = pl.DataFrame(
        {
            "rollout_id": [f"r{i}" for i in range(5)],
            "iteration": [0] * 5,
            "prompt_id": ["p"] * 5,
            "prompt": ["q"] * 5,
            "completion": completions,
            "label": [label] * 5,
        }
    )
    p_yes = [0.9, 0.8, 0.1, 0.2, 0.7]
    scores = pl.DataFrame(
        {"rollout_id": rollouts["rollout_id"], "evaluator": ["e"] * 5, "question_id": ["q"] * 5,
         "p_yes": p_yes, "logp_yes": [math.log(p) for p in p_yes], "status": ["ok"] * 5}
    )  # fmt: skip
    got = {}
    for fmt in ("gsm8k", "answer_is"):
        ss = Scoreset("x", scores.lazy(), pl.LazyFrame(), rollouts.lazy(), {"e": 1.0}, {"q": 1.0}, {"q": "?"}, "logp", -13.8, None, fmt)  # fmt: skip
        correct = labels.correctness(ss).collect().sort("rollout_id")["correct"].to_list()
        got[fmt] = (correct, labels.label_metrics(ss).row(0, named=True)["auroc"])
    assert got["gsm8k"] == ([True, True, False, False, True], 1.0)
    assert got["answer_is"] == ([False, True, False, False, False], 0.75)  # 0.8 tops 0.1, 0.2, 0.7, not 0.9
    assert labels.label_metrics(ss).row(0, named=True)["n_correct"] == 1
