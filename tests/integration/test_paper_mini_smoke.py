"""The "does it learn" benchmark at a tiny size, so the script cannot rot: the base, two judge seeds trained
to a target with their quality-level checkpoints, every experiment through the real pipeline (main, the
threshold sweep, the mitigations, the recipe, the trade-off, the evaluator configurations from a self-judging
base), the tables, the plot, results.json; and the curve cache, which a retrained judge invalidates. Learning itself is the
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
    every = "main,threshold,mitigations,recipe,tradeoff,self,self_recipe"
    result = bench.main(
        ["--size", "smoke", "--out", str(out), "--cache", str(cache), "--jobs", "1", "--experiments", every]
    )

    judges = result["judges"]
    assert sorted(judges) == [1, 2]
    for js, j in judges.items():
        assert 0 < j["steps"] <= 30 and "0" in j["levels"], j  # the smoke level 0 is passed at the first check
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
    # live self judges with the policy, frozen self with its initial weights, both the self-judging base's
    me = str(cache / "self-judging-base-smoke")
    assert result["self_judging_base"]["steps"] > 0 and (Path(me) / "model.safetensors").is_file()
    for name, evaluator in (("live", "policy"), ("frozen", "policy@initial"), ("rlvr", None), ("other", None)):
        ran = json.loads((out / "runs" / f"self-{name}-s0" / "run.json").read_text())["config"]  # what the pipeline ran
        assert ran["policy"]["model"] == me and ran["optimizer"]["lr"] == 1e-4, name  # the smoke size's self_rl
        assert result["curves"][f"self-{name}-s0"][0]["accuracy"] == result["curves"]["self-rlvr-s0"][0]["accuracy"]
        if evaluator:
            assert [e["model"] for e in ran["evaluators"]] == [evaluator], name
    s = result["summary"]
    assert s["main"]["rlme"]["n"] == 2 and set(s["main"]["rlme"]["by_judge"]) == {1, 2}
    assert s["main"]["rlme"]["minus_rlvr_same_seed"]["n"] == 2  # each judge seed's run against RLVR's, seed 0
    assert (
        s["main"]["rlme, ensemble of the judge seeds"]["n"] == 1 and len(result["runs"]["ensemble-s0"]["judges"]) == 2
    )
    assert {p["judge_seed"] for p in s["threshold"]} == {1, 2}
    assert "ensemble of the judge seeds" in s["mitigations"]["0"]
    assert set(s["self"]) == {"rlvr", "live", "frozen", "other"} and s["self"]["live"]["n"] == 1
    assert set(s["self_recipe"]) == {"main", "low"} and result["runs"]["self-recipe-low-s100"]["rl"]["lr"] == 3e-5
    assert set(s["tradeoff"]) == {"0", "2"} and all(0.0 <= t["even_share"] <= 1.0 for t in s["tradeoff"].values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"].keys() == s.keys()
    md = (out / "results.md").read_text()
    assert (
        "| rlvr |" in md
        and "### Threshold" in md
        and "### Evaluator configurations" in md
        and "### RL recipe" in md
        and "### Trade-off" in md
    )
    assert (out / "curves.png").stat().st_size > 1000 and (out / "judges.png").stat().st_size > 1000
    # a rerun reuses the cached models (no SFT) and the finished runs' curves (no RL)
    again = bench.main(
        ["--size", "smoke", "--out", str(out), "--cache", str(cache), "--jobs", "1", "--experiments", "judges,main"]
        + ["--methods", "rlvr"]
    )
    assert again["judges"] == result["judges"]
    assert again["curves"] == {"rlvr-s0": result["curves"]["rlvr-s0"]} and again["seconds"]["rl"] < 1

    # a judge retrained at the same path is a different judge: its runs are redone, not read from the cache.
    # `check` (the default) is `main` with the first judge seed only
    from safetensors.torch import load_file, save_file

    judge1 = cache / "judges-smoke" / "seed-1" / "model.safetensors"
    old = bench.weights_id(str(judge1.parent))
    tensors = load_file(judge1)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 0.01
    save_file(tensors, judge1, metadata={"format": "pt"})
    redone = bench.main(
        ["--size", "smoke", "--out", str(out), "--cache", str(cache), "--jobs", "1", "--methods", "rlme"]
    )
    assert sorted(redone["judges"]) == [1] and set(redone["curves"]) == {"rlme-j1-s0"}
    made_by = json.loads((out / "curves" / "rlme-j1-s0.json").read_text())["made_by"]
    assert made_by["weights"][str(judge1.parent)] == bench.weights_id(str(judge1.parent)) != old
