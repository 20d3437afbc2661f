"""The update lets go of its gradients, and picks AdamW's implementation by device (fused on CUDA only)."""

from __future__ import annotations

import polars as pl
import torch
from transformers import AutoModelForCausalLM

from rlme_pipeline.config import load_config
from rlme_pipeline.models.loading import Loaded, load_tokenizer
from rlme_pipeline.stages.update import fused_adamw, new_optimizer, update
from tests.conftest import DEMO


def _tables(n: int = 8) -> tuple[pl.DataFrame, pl.DataFrame]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        c = 2 + i % 5
        rows.append(
            {
                "rollout_id": f"r{i:02d}",
                "prompt_id": f"p{i // 4}",
                "sample_index": i % 4,
                "prompt_token_ids": torch.randint(5, 500, (3 + i % 4,), generator=g).tolist(),
                "completion_token_ids": torch.randint(5, 500, (c,), generator=g).tolist(),
                "behavior_logprobs": (-torch.rand(c, generator=g) * 5).tolist(),
            }
        )
    rollouts = pl.DataFrame(rows)
    rewards = pl.DataFrame({"rollout_id": rollouts["rollout_id"], "advantage": [float(i % 3 - 1) for i in range(n)]})
    return rollouts, rewards


def test_gradients_are_freed_after_every_step(tiny_models):
    """A full fp32 copy of the weights would otherwise sit in memory through the next generate and score."""
    cfg = load_config(DEMO)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    lm = Loaded(model, load_tokenizer(tiny_models["policy"]), "v0", str(tiny_models["policy"]))
    before = [p.detach().clone() for p in model.parameters()]
    opt, _, metrics = update(cfg, 0, *_tables(), lm, None, None)

    assert metrics["optimizer_steps"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it did train
    assert all(p.grad is None for p in model.parameters())


def test_fused_adamw_only_when_every_parameter_is_on_cuda():
    # device objects need no GPU: this is the decision the update makes on a CUDA host
    assert fused_adamw(["cuda:0", "cuda:0"])
    assert fused_adamw([torch.device("cuda", 1)])
    assert not fused_adamw(["cpu"])
    assert not fused_adamw(["cuda:0", "cpu"])
    assert not fused_adamw([])


def test_cpu_optimizer_stays_plain_even_from_a_fused_checkpoint(tiny_models):
    """A checkpoint written on a GPU (fused) resumes on a CPU with the plain loop, and the CPU keeps
    the implementation (and so the numbers) it always had."""
    cfg = load_config(DEMO)
    w = torch.nn.Parameter(torch.randn(4, 3))
    fused = torch.optim.AdamW([w], lr=1e-3, fused=True)  # the fused kernel exists on CPU too
    w.grad = torch.randn(4, 3)
    fused.step()
    saved = fused.state_dict()
    assert saved["param_groups"][0]["fused"] is True

    opt = new_optimizer([w], cfg, saved)
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["foreach"] is None
    assert torch.equal(opt.state[w]["exp_avg"], saved["state"][0]["exp_avg"])
    assert opt.state[w]["step"].device.type == "cpu"
    w.grad = torch.randn(4, 3)
    opt.step()  # runs with the state it loaded
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
