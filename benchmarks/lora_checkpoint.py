"""Checkpoint bytes of a LoRA policy against full fine-tuning: the tiny demo, trained for real, and the
Qwen2.5-0.5B shape, counted on the meta device (no weights). `PYTHONPATH=. python -m benchmarks.lora_checkpoint`

A checkpoint holds fp32 weights plus AdamW's two fp32 moments: 12 bytes per trained parameter (full: every
parameter; LoRA: the adapter's r * (in + out) per target module)."""

from __future__ import annotations

import sys
import tempfile

import torch
import yaml

from rlme_pipeline.config import validate_config
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage.run import Run

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def demo_bytes(lora: dict | None, root: str) -> int:
    d = yaml.safe_load(open("configs/demo.yaml"))
    d["run"].update(storage=f"{root}/runs", iterations=1)
    d["data"]["path"] = "data/demo_prompts.jsonl"
    d["policy"]["lora"] = lora
    d["probe"]["every"] = 0
    cfg = validate_config(d)
    run = Run.for_config(cfg)
    train(cfg, run)
    return sum(f.bytes for f in checkpoint.files_of(run.manifest(0).files, 0))


def qwen_shape_params(r: int) -> tuple[int, int]:
    """(all parameters, LoRA parameters) of a Qwen2.5-0.5B-shaped model, built on the meta device."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from benchmarks.gpu import POLICY_QWEN05, QWEN_VOCAB  # the one definition of the shape

    c = Qwen2Config(vocab_size=QWEN_VOCAB, **{k: v for k, v in POLICY_QWEN05.items() if k != "arch"})
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    full = sum(p.numel() for p in m.parameters())
    lora = sum(
        r * (mod.in_features + mod.out_features)
        for name, mod in m.named_modules()
        if name.rpartition(".")[2] in TARGETS
    )
    return full, lora


def main() -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        full, lora = demo_bytes(None, a), demo_bytes({"r": 16}, b)
    print(f"tiny demo checkpoint: full {full:,} B, LoRA r=16 {lora:,} B ({100 * lora / full:.2f}%)")
    p_full, p_lora = qwen_shape_params(16)
    print(
        f"Qwen2.5-0.5B shape: {p_full:,} parameters, LoRA r=16 on {TARGETS}: {p_lora:,}; checkpoint "
        f"(12 B/trained param) full {12 * p_full / 2**30:.2f} GiB, LoRA {12 * p_lora / 2**20:.1f} MiB "
        f"({100 * p_lora / p_full:.2f}%)"
    )


if __name__ == "__main__":
    sys.exit(main())
