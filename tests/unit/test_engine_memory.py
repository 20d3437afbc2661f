"""The vLLM engine's share of the trainer's GPU (jobs/memory.py engine_share), checked by hand, and the
memory a vLLM-generating policy no longer holds (no half-precision inference copy). No GPU needed: the
estimate is arithmetic on config.json files."""

from __future__ import annotations

import pytest

from rlme_pipeline.config import validate_config
from rlme_pipeline.data import load_prompts
from rlme_pipeline.jobs import memory
from rlme_pipeline.jobs.memory import GiB
from tests.conftest import demo_dict
from tests.unit.test_memory_estimate import SHAPE, P, _by, _cfg


def test_engine_share_by_hand():
    # 80 GiB device, the trainer holds 10 GiB between stages and adds at most 6 GiB (its update); 2 GiB reserved
    assert memory.engine_share(80 * GiB, 10 * GiB, 6 * GiB, GiB, sleeps=True) == 0.85  # (80 - 10 - 2) / 80
    assert memory.engine_share(80 * GiB, 10 * GiB, 6 * GiB, GiB, sleeps=False) == 0.77  # (80 - 10 - 6 - 2) / 80
    assert memory.engine_share(80 * GiB, 10 * GiB, 6 * GiB, GiB, sleeps=True, reserve=0) == 0.87  # 70/80 = 0.875
    # 16 GiB device, 12 GiB held: 2 GiB left after the reserve, the engine needs its 2 GiB of weights + 1 GiB
    with pytest.raises(ValueError, match=r"^vllm.gpu_memory_utilization: the trainer holds 12.00 GiB of 16.00 GiB"):
        memory.engine_share(16 * GiB, 12 * GiB, GiB, 2 * GiB, sleeps=True)
    assert memory.engine_share(16 * GiB, 11 * GiB, GiB, 2 * GiB, sleeps=True) == 0.18  # 3 GiB: just enough
    with pytest.raises(ValueError, match="its busiest stage 1.00 GiB"):  # awake, the update's GiB is not left
        memory.engine_share(16 * GiB, 11 * GiB, GiB, 2 * GiB, sleeps=False)


def test_a_vllm_policy_holds_no_half_copy_unless_hf_reads_it():
    shapes = {"qwen": SHAPE, "judge": SHAPE}
    vllm = memory.estimate(_cfg(generation={"backend": "vllm"}), shapes, 64, 32)
    assert _by(vllm, "held") == {"policy weights": 4 * P, "AdamW state": 8 * P, "evaluator judge": 2 * P}
    held, busiest = memory.beside_engine(vllm, "cuda:0")
    assert held == 14 * P and busiest == sum(_by(vllm, "update").values())  # the update outweighs scoring
    # a live-self evaluator judging on hf reads the bf16 policy: the copy stays
    d = _cfg(generation={"backend": "vllm"}).model_dump(mode="json")
    d["evaluators"].append({"name": "live", "model": "policy"})
    live = memory.estimate(validate_config(d), shapes, 64, 32)
    assert _by(live, "held")["bfloat16 copy that generates and judges"] == 2 * P


@pytest.mark.parametrize("sleep", [True, False])
def test_colocated_share_from_the_real_model_files(tiny_models, sleep):
    """The glue the runner calls: the demo on cuda (nothing loads onto the device), its tiny models'
    config.json and tokenizer, a given device size."""
    d = demo_dict()
    d["policy"]["device"] = "cuda"
    d["generation"]["backend"] = "vllm"
    d["vllm"] = {"sleep": sleep}
    cfg = validate_config(d)
    p = memory.shape_of(str(tiny_models["policy"])).params
    parts = memory.estimate(cfg, *memory.inputs(cfg, load_prompts(cfg), _tok(tiny_models)))
    held, busiest = memory.beside_engine(parts, "cuda:0")
    # float32: weights 4 + AdamW 8 + the initial policy (the demo's frozen self) 4; the evaluator is on the CPU
    assert held == 16 * p
    room = 8 * GiB - held - memory.ENGINE_RESERVE - (0 if sleep else busiest)
    assert memory.colocated_share(cfg, load_prompts(cfg), total=8 * GiB) == (100 * room // (8 * GiB)) / 100
    with pytest.raises(ValueError, match="^vllm.gpu_memory_utilization: the trainer holds"):
        memory.colocated_share(cfg, load_prompts(cfg), total=3 * GiB)


def _tok(tiny_models):
    from rlme_pipeline.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_models["policy"]))


def test_the_share_is_set_once_and_named_when_generate_runs_out_of_memory():
    from rlme_pipeline.config import VllmConfig
    from rlme_pipeline.jobs import oom

    with pytest.raises(ValueError, match="vllm.engine_kwargs.gpu_memory_utilization: set once"):
        VllmConfig(gpu_memory_utilization=0.5, engine_kwargs={"gpu_memory_utilization": 0.4})
    with pytest.raises(ValueError):
        VllmConfig(gpu_memory_utilization=1.5)
    cfg = _cfg(generation={"backend": "vllm"}, vllm={"gpu_memory_utilization": 0.5})
    assert ("vllm.gpu_memory_utilization", "lower than 0.5") in [(f, a) for _, f, a in oom.knobs(cfg, "generate")]
    served = [a for _, f, a in oom.knobs(_cfg(generation={"backend": "openai"}), "generate") if f == "vllm.server_args"]
    assert served == ["--gpu-memory-utilization lower"]
