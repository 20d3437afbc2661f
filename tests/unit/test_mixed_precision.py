"""bf16 policies: bf16 compute over fp32 master weights and fp32 AdamW state.

A bf16 weight near 0.02 has a spacing of about 8e-5, so an AdamW step of lr=1e-5 rounds away in pure
bf16; the fp32 master must keep it. The half copy that generates must be exactly what loading the fp32
checkpoint in bf16 gives, or a resumed run would generate differently from an uninterrupted one.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlme_pipeline.config import load_config
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.loading import inference_copy, master_dtype
from rlme_pipeline.stages.update import accumulate_step
from rlme_pipeline.storage.run import Run
from tests.conftest import DEMO
from tests.unit.test_update_device import _items


def _bf16_cfg(tmp_path, **over):
    cfg = load_config(DEMO)
    d = cfg.model_dump()
    d["policy"]["dtype"] = "bfloat16"
    d["run"].update(storage=str(tmp_path / "runs"), iterations=2)
    d["data"]["path"] = cfg.resolve(cfg.data.path)
    d["eval"]["every"] = 0  # the held-out eval is not what this test is about
    d["data"]["prompts_per_iteration"] = 2
    d["generation"].update(group_size=2, max_new_tokens=8)
    d["probe"]["every"] = 0
    d["optimizer"].update(micro_batch_size=2, grad_accumulation=2, **over)
    return cfg.model_validate(d)


def _changed_share(before: dict, model) -> float:
    changed = total = 0
    for n, p in model.named_parameters():
        changed += (p.detach().float() != before[n].float()).sum().item()
        total += p.numel()
    return changed / total


def test_a_small_step_moves_the_fp32_master_where_pure_bf16_rounds_it_away(tiny_models, tmp_path):
    cfg = _bf16_cfg(tmp_path, lr=1e-5)
    assert master_dtype(cfg.policy.dtype) == "float32"
    shares, seen = {}, {}
    for name, dtype in (("master", torch.float32), ("pure_bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=dtype).train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        layer = model.model.layers[0].self_attn.q_proj
        hook = layer.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o.dtype) and None)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
        accumulate_step(
            model,
            None,
            _items(4),
            cfg,
            pad_id=0,
            sums={k: 0.0 for k in ("loss", "clipped", "kl", "tokens", "mismatch", "mismatch_tokens")},
            first=True,
        )
        opt.step()
        hook.remove()
        shares[name] = _changed_share(before, model)
        if name == "master":
            assert all(s["exp_avg_sq"].dtype == torch.float32 for s in opt.state.values())
    assert seen == {"master": torch.bfloat16, "pure_bf16": torch.bfloat16}  # both computed in bf16
    assert shares["master"] > 0.95, shares
    assert shares["pure_bf16"] < 0.5, shares  # the bug the master weights fix


def test_the_bf16_copy_is_exactly_the_checkpoint_loaded_in_bf16(tiny_models, tmp_path):
    master = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    with torch.no_grad():
        for p in master.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # weights that bf16 cannot hold exactly
    master.save_pretrained(tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16).eval()
    copy = inference_copy(master, "bfloat16")
    for (n, a), (m, b) in zip(
        list(copy.named_parameters()) + list(copy.named_buffers()),
        list(loaded.named_parameters()) + list(loaded.named_buffers()),
    ):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
    assert next(master.parameters()).dtype == torch.float32  # the master is untouched
    ids = torch.tensor([[1, 5, 9, 14, 30]])
    assert torch.equal(copy(ids).logits, loaded(ids).logits)


def test_a_bf16_run_saves_fp32_master_weights_and_resumes_identically(tiny_models, tmp_path):
    straight = _bf16_cfg(tmp_path / "a")
    train(straight, Run.for_config(straight))
    run = Run.for_config(straight)
    files = checkpoint.files_of(run.manifest(1).files, 1)
    weights = load_file(run.store.abs(checkpoint.weights_entry(files).path))
    assert {t.dtype for t in weights.values()} == {torch.float32}

    resumed = _bf16_cfg(tmp_path / "b")
    train(resumed.with_overrides(iterations=1), Run.for_config(resumed))
    # each train() opens its own Backends (model pool): like a new process, the master and its bf16 copy
    # come back from the checkpoint's files
    train(resumed, Run.for_config(resumed))
    contents = [
        {f.logical: f.sha256 for i in (0, 1) for f in Run.for_config(c).manifest(i).files} for c in (straight, resumed)
    ]
    assert contents[0] == contents[1]
