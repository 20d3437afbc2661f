"""The preflight GPU memory estimate: a pure function of model shapes and the config, checked by hand.

Shapes come from config.json alone (a model built on the meta device); the Qwen2.5-0.5B shape below is the
real model's (494,032,768 parameters, counted from its weights in docs/gpu.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlme_pipeline.config import validate_config
from rlme_pipeline.data import load_prompts
from rlme_pipeline.jobs import memory
from rlme_pipeline.jobs.memory import GiB, Shape
from rlme_pipeline.jobs.preflight import gpu_memory_notes
from rlme_pipeline.models.loading import load_tokenizer
from tests.conftest import demo_dict

QWEN_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
P = 494_032_768
SHAPE = Shape(params=P, layers=24, hidden=896, intermediate=4864, vocab=151936, kv_dim=128)


def _cfg(**sections):
    d = demo_dict()
    d["policy"] = {"model": "qwen", "dtype": "bfloat16", "device": "cuda"}
    d["evaluators"] = [{"name": "judge", "model": "judge", "dtype": "bfloat16", "device": "cuda"}]
    d["generation"].update(batch_size=16, max_new_tokens=192)
    d["scoring"].update(batch_size=16)
    d["optimizer"].update(micro_batch_size=8, logprob_chunk_tokens=256)
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return validate_config(d)


def test_shape_from_config_json_counts_parameters_exactly(tmp_path, tiny_models):
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(QWEN_05B))
    assert memory.shape_of(str(tmp_path / "qwen")) == SHAPE

    tiny = memory.shape_of(str(tiny_models["policy"]))
    loaded = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    assert tiny.params == sum(p.numel() for p in loaded.parameters())

    lora = _cfg(policy={"lora": {"r": 16}}).policy.lora
    # docs/gpu.md: 16·(1792+1024+1024+1792) = 90,112 per layer x 24 layers
    assert memory.shape_of(str(tmp_path / "qwen"), lora).lora_params == 2_162_688


def _by(parts, stage):
    return {p.what.split(" (")[0].split(" of ")[0]: p.bytes for p in parts if p.stage == stage}


def test_estimate_by_hand_bf16_policy_and_judge():
    cfg = _cfg()
    parts = memory.estimate(cfg, {"qwen": SHAPE, "judge": SHAPE}, prompt_tokens=64, question_tokens=32)
    held = _by(parts, "held")
    assert held == {
        "policy weights": 4 * P,  # fp32 master
        "AdamW state": 8 * P,  # two fp32 moments
        "bfloat16 copy that generates and judges": 2 * P,
        "evaluator judge": 2 * P,
    }
    update = _by(parts, "update")
    assert update["gradients"] == 4 * P
    # 2 bytes x 24 layers x (8 x 256 tokens) x (8·896 + 3·4864)
    assert update["activations"] == 2 * 24 * 2048 * 21760 == 2_139_095_040
    assert update["LM head chunks"] == 12 * 256 * 151936
    generate = _by(parts, "generate")
    assert generate["KV cache"] == 2 * 24 * 128 * 2 * 16 * 256  # k and v, per layer, 16 rows of 64 + 192
    score = _by(parts, "score")
    assert score["KV cache"] == 2 * 24 * 128 * 2 * 16 * (64 + 192 + 32)

    peak, at = memory.peaks(parts)["cuda:0"]
    assert at == "update"
    assert peak == 16 * P + 4 * P + 2_139_095_040 + 12 * 256 * 151936 == 12_486_497_792  # 11.63 GiB
    lines = memory.report(parts, {"cuda:0": 80 * GiB})
    assert lines[0] == "GPU memory estimate for cuda:0 (before anything loads): peak 11.63 GiB at update of 80.00 GiB"
    text = "\n".join(lines)
    for knob in ("generation.batch_size 16", "scoring.batch_size 16", "optimizer.micro_batch_size 8",
                 "optimizer.gradient_checkpointing false", "optimizer.logprob_chunk_tokens 256"):  # fmt: skip
        assert knob in text
    assert "exceeds" not in text and "policy.lora" in lines[-1] and "policy.dtype" in lines[-1]
    small = memory.report(parts, {"cuda:0": 8 * GiB})
    assert small[-1].startswith("  exceeds the device by 3.63 GiB; knobs: generation.batch_size")


def test_gradient_checkpointing_and_lora_and_kl_reference_by_hand():
    ckpt = memory.estimate(_cfg(optimizer={"gradient_checkpointing": True}), {"qwen": SHAPE, "judge": SHAPE}, 64, 32)
    # each layer's input (2 B x 24 x 2048 tokens x 896) plus one layer's activations
    assert _by(ckpt, "update")["activations"] == 2 * 24 * 2048 * 896 + 2 * 2048 * 21760 == 177_209_344

    kl = _by(memory.estimate(_cfg(algorithm={"beta": 0.1}), {"qwen": SHAPE, "judge": SHAPE}, 64, 32), "held")
    assert kl["initial policy"] == 2 * P

    lora = Shape(**{**SHAPE.__dict__, "lora_params": 2_162_688})
    parts = memory.estimate(_cfg(policy={"lora": {"r": 16}}, algorithm={"beta": 0.1}), {"qwen": lora, "judge": SHAPE}, 64, 32)  # fmt: skip
    held = _by(parts, "held")
    assert held == {
        "policy base weights": 2 * P,
        "LoRA adapter + AdamW state": 12 * 2_162_688,
        "evaluator judge": 2 * P,
    }
    assert _by(parts, "update")["gradients"] == 4 * 2_162_688


def test_evaluators_on_another_gpu_are_counted_there():
    cfg = _cfg(generation={"backend": "hf"})
    d = cfg.model_dump(mode="json")
    d["evaluators"][0]["device"] = "cuda:1"
    parts = memory.estimate(validate_config(d), {"qwen": SHAPE, "judge": SHAPE}, 64, 32)
    peaks = memory.peaks(parts)
    assert set(peaks) == {"cuda:0", "cuda:1"}
    assert peaks["cuda:1"][1] == "score"
    assert sum(p.bytes for p in parts if p.device == "cuda:1" and p.stage == "held") == 2 * P


def test_float32_policy_line_says_what_bfloat16_would_change():
    shapes = {"qwen": SHAPE, "judge": SHAPE}
    line = memory.float32_cost(_cfg(policy={"dtype": "float32"}), shapes, 64, 32)
    assert line.startswith("policy.dtype: float32 on cuda:0")
    assert "set policy.dtype: bfloat16" in line
    assert memory.float32_cost(_cfg(), shapes, 64, 32) is None  # already bf16
    assert memory.float32_cost(_cfg(policy={"dtype": "float32", "device": "cpu"}), shapes, 64, 32) is None


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_preflight_notes_come_from_the_real_model_files(tiny_models, device):
    """The glue preflight runs: tiny models' config.json and tokenizer, the demo's prompts (no GPU needed:
    nothing loads onto the device)."""
    d = demo_dict()
    d["policy"]["device"] = device
    cfg = validate_config(d)
    tok = load_tokenizer(str(tiny_models["policy"]))
    notes = gpu_memory_notes(cfg, load_prompts(cfg), tok)
    if device == "cpu":
        assert notes == []
        return
    assert notes[0].startswith("GPU memory estimate for cuda:0 (before anything loads): peak ")
    assert any("generation.batch_size 32" in n for n in notes)
    assert notes[-1].startswith("policy.dtype: float32 on cuda:0")
    assert torch.cuda.is_available() or " of " not in notes[0].split("at ")[-1]
