"""The "does it learn" benchmark at a tiny size, so the script cannot rot: the base, two judge seeds trained
to a target with their quality-level checkpoints, every experiment through the real pipeline (main, the
threshold sweep, the mitigations, the recipe), the tables, the plot, results.json. Learning itself is the
full-size run's job (docs/paper_mini.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tests.requires import require

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "paper_mini" / "bench.py"


def test_paper_mini_smoke(tmp_path):
    require("matplotlib")  # the plot and the rerun below must run in CI, not return early
    spec = importlib.util.spec_from_file_location("paper_mini_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["paper_mini_bench"] = bench
    spec.loader.exec_module(bench)
    out, cache = tmp_path / "out", tmp_path / "cache"
    every = "main,threshold,mitigations,recipe,tradeoff"
    result = bench.main(
        ["--size", "smoke", "--out", str(out), "--cache", str(cache), "--jobs", "1", "--experiments", every]
    )

    judges = result["judges"]
    assert sorted(judges) == [1, 2]
    for js, j in judges.items():
        assert 0 < j["steps"] <= 20 and "0" in j["levels"], j  # the smoke level 0 is passed at the first check
        assert (cache / "judges-smoke" / f"seed-{js}" / "level-0" / "model.safetensors").is_file()
    runs = set(result["curves"])
    assert {"rlvr-s0", "rlme-j1-s0", "rlme_10gt-j2-s0", "rlme-j2-l0-s0", "ensemble-l0-s0", "kl-j1-l0-s0"} <= runs
    assert any(r.startswith("recipe-cosine-s") for r in runs) and {"tradeoff-w0-s0", "tradeoff-w2-s0"} <= runs
    # the trade-off asks the two-question judge both questions, the second at its weight
    assert result["runs"]["tradeoff-w2-s0"]["rl"]["even_weight"] == 2.0
    assert 0.0 <= result["two_question_judge"]["even_auroc"] <= 1.0
    assert (cache / "judges-smoke" / "seed-1-even" / "model.safetensors").is_file()
    for rid, curve in result["curves"].items():
        assert [r["iteration"] for r in curve] == [0, 1, 2], rid
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in curve)
        assert all(r["reward_mean"] is not None for r in curve[1:])
    # RLVR's reward is exact match: 0 for right, the floor for wrong, so its mean is in [floor, 0]
    assert all(bench.FLOOR - 1e-9 <= r["reward_mean"] <= 1e-9 for r in result["curves"]["rlvr-s0"][1:])
    # a judged run carries the label-free watcher (the other judge seed) beside the training judge
    assert all(r["watch_p_yes"] is not None for r in result["curves"]["rlme-j1-s0"])
    # the ensemble scores with both judge seeds: two evaluators in its config
    assert len(result["runs"]["ensemble-l0-s0"]["judges"]) == 2
    s = result["summary"]
    assert s["main"]["rlme"]["n"] == 2 and set(s["main"]["rlme"]["by_judge"]) == {1, 2}
    assert s["main"]["rlme"]["minus_rlvr_same_seed"]["n"] == 2  # each judge seed's run against RLVR's, seed 0
    assert (
        s["main"]["rlme, ensemble of the judge seeds"]["n"] == 1 and len(result["runs"]["ensemble-s0"]["judges"]) == 2
    )
    assert {p["judge_seed"] for p in s["threshold"]} == {1, 2}
    assert "ensemble of the judge seeds" in s["mitigations"]["0"]
    assert set(s["tradeoff"]) == {"0", "2"} and all(0.0 <= t["even_share"] <= 1.0 for t in s["tradeoff"].values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"].keys() == s.keys()
    md = (out / "results.md").read_text()
    assert "| rlvr |" in md and "### Threshold" in md and "### RL recipe" in md and "### Trade-off" in md
    assert (out / "curves.png").stat().st_size > 1000 and (out / "judges.png").stat().st_size > 1000
    # a rerun reuses the cached models (no SFT) and the finished runs' curves (no RL)
    again = bench.main(
        ["--size", "smoke", "--out", str(out), "--cache", str(cache), "--jobs", "1", "--experiments", "judges,main"]
        + ["--methods", "rlvr"]
    )
    assert again["judges"] == result["judges"]
    assert again["curves"] == {"rlvr-s0": result["curves"]["rlvr-s0"]} and again["seconds"]["rl"] < 1
