"""An `rlme export` directory is what vLLM serves: in-process vllm.LLM loads it as it is and judges with the
logits of the policy the run trained (the same contract as the backends' on the tiny model)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from rlme_pipeline.models.export import export
from tests.backends.conftest import direct_judgements_of, run_inproc_vllm
from tests.backends.test_contract import TOL
from tests.integration.test_export import run_policy, train_small


def test_vllm_loads_an_export_and_judges_with_the_trained_policys_logits(vllm_python, spec, tmp_path, tiny_models):
    run = train_small(tmp_path, "full", iterations=1)
    out = export(run, tmp_path / "export").out
    policy = run_policy(run, 0)
    initial = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    x = torch.tensor([spec["prefixes"][0]])
    with torch.no_grad():  # the checkpoint is not the initial model: vLLM must read the trained weights to pass
        assert not torch.allclose(policy(x).logits, initial(x).logits, atol=TOL)
    r = run_inproc_vllm(vllm_python, str(out), spec)
    want = direct_judgements_of(policy, spec)
    worst = 0.0
    for row, ref_row in zip(r["judge"][:-1], want, strict=True):
        for j, (ref_yes, ref_no) in zip(row, ref_row, strict=True):
            assert j["status"] == "ok"
            worst = max(worst, abs(j["logp_yes"] - ref_yes), abs(j["logp_no"] - ref_no))
    print(f"vllm on an export: judge |delta logp| vs the run's policy, max {worst:.2e}")
    assert worst < TOL
