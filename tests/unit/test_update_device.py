"""The update's math keeps every tensor on the model's device.

There is no GPU here, so the model goes to the 'meta' device: torch refuses to mix a meta tensor with a
CPU tensor ("Tensor on device cpu is not on the expected device meta!"), exactly as CUDA refuses to mix
with the CPU, and a meta tensor cannot be read on the host (`.item()` raises), so a hidden per-micro-batch
host sync fails too. Eager attention: transformers' SDPA mask helper reads a mask value on the host.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlme_pipeline.config import load_config
from rlme_pipeline.stages.update import accumulate_step, new_sums
from tests.conftest import DEMO


def _items(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, c = 3 + i % 4, 2 + i % 5
        out.append(
            {
                "prompt_token_ids": torch.randint(5, 500, (p,), generator=g).tolist(),
                "completion_token_ids": torch.randint(5, 500, (c,), generator=g).tolist(),
                "behavior_logprobs": (-torch.rand(c, generator=g) * 5).tolist(),
                "advantage": float(i % 3 - 1),
            }
        )
    return out


def _meta_model(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").to("meta").train()


@pytest.mark.parametrize("loss,beta", [("cispo", 0.0), ("grpo", 0.1), ("dr_grpo", 0.0)])
def test_update_step_keeps_every_tensor_on_the_models_device(tiny_models, loss, beta):
    cfg = load_config(DEMO)
    cfg = cfg.model_validate(
        {
            **cfg.model_dump(),
            "algorithm": {"loss": loss, "beta": beta},
            "optimizer": {"micro_batch_size": 3, "grad_accumulation": 2},
        }
    )
    model = _meta_model(tiny_models["policy"])
    reference = _meta_model(tiny_models["policy"]).eval() if beta > 0 else None
    sums = new_sums()
    accumulate_step(model, reference, _items(6), cfg, pad_id=0, sums=sums, first=True)
    sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()

    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    tensors = {k: v for k, v in sums.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) >= {"loss", "clipped", "grad_norm", "mismatch"} | ({"kl"} if beta > 0 else set())
    assert {v.device.type for v in tensors.values()} == {"meta"}
    assert sums["tokens"] == sum(len(it["completion_token_ids"]) for it in _items(6))
