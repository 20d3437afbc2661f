"""One training process loads each model once: the pool holds every model the config names.

Loading stays real (transformers' from_pretrained on the tiny models); the tests only count the calls.
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
from transformers import AutoModelForCausalLM

from rlme_pipeline.config import validate_config
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.weights_at import pool_capacity
from rlme_pipeline.storage.run import Run
from tests.conftest import demo_dict


def _config(tmp_path, tiny_models, dtype: str, evaluators: list[dict], beta: float):
    d = demo_dict()
    d["run"].update(id="pool", storage=str(tmp_path / "runs"), iterations=3)
    d["data"].update(prompts_per_iteration=2)
    d["policy"].update(dtype=dtype)
    d["evaluators"] = evaluators
    d["questions"] = d["questions"][:1]
    d["generation"].update(group_size=2, max_new_tokens=8)
    d["algorithm"].update(beta=beta)
    d["optimizer"].update(epochs=1, micro_batch_size=4)
    d["probe"].update(every=0)
    d.pop("eval", None)
    return validate_config(d)


def _judges(tmp_path, tiny_models, n: int) -> list[str]:
    """n different frozen-other evaluators: copies of the tiny evaluator in their own directories."""
    paths = []
    for k in range(n):
        paths.append(str(shutil.copytree(tiny_models["evaluator"], tmp_path / f"judge{k}")))
    return paths


@pytest.fixture
def loads(monkeypatch):
    """(path, dtype) of every from_pretrained of a causal LM, and every optimizer state read from disk."""
    seen = {"models": Counter(), "optimizer_reads": 0}
    real_model, real_opt = AutoModelForCausalLM.from_pretrained, checkpoint.load_optimizer_state

    def counted_model(path, *args, **kw):
        seen["models"][(str(path), str(kw.get("dtype")))] += 1
        return real_model(path, *args, **kw)

    def counted_opt(path):
        seen["optimizer_reads"] += 1
        return real_opt(path)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(counted_model))
    monkeypatch.setattr(checkpoint, "load_optimizer_state", counted_opt)
    return seen


@pytest.mark.parametrize(
    "dtype, frozen_others, self_judges",
    [
        ("float32", 3, []),  # 3 frozen others + the KL reference + the policy: 5 models
        ("bfloat16", 2, ["policy@initial", "policy"]),  # master + bf16 copy + 2 others + frozen self/KL: 5
    ],
)
def test_three_iterations_load_each_model_once(tmp_path, tiny_models, loads, dtype, frozen_others, self_judges):
    judges = _judges(tmp_path, tiny_models, frozen_others)
    evaluators = [{"name": f"other{k}", "model": p} for k, p in enumerate(judges)]
    evaluators += [{"name": f"self{k}", "model": m} for k, m in enumerate(self_judges)]
    cfg = _config(tmp_path, tiny_models, dtype, evaluators, beta=0.1)
    assert pool_capacity(cfg) == 5

    train(cfg, Run.for_config(cfg))

    policy = str(tiny_models["policy"])
    expected = Counter({(p, "torch.float32"): 1 for p in judges})
    expected[(policy, "torch.float32")] = 1  # the master (and, at float32, the frozen KL reference: a copy)
    if dtype == "bfloat16":
        expected[(policy, "torch.bfloat16")] = 1  # what generated iteration 0: the frozen self and KL reference
    assert loads["models"] == expected
    # the optimizer that trained iteration i trains i + 1 from memory: its state is never read back
    assert loads["optimizer_reads"] == 0


def test_pool_capacity_counts_distinct_models(tmp_path, tiny_models):
    judge = str(tiny_models["evaluator"])
    one = [{"name": "other", "model": judge}]

    def cap(dtype="float32", evaluators=one, beta=0.0, **policy):
        cfg = _config(tmp_path, tiny_models, dtype, evaluators, beta)
        if policy:
            d = cfg.model_dump(mode="json")
            d["policy"].update(policy)
            cfg = validate_config(d)
        return pool_capacity(cfg)

    assert cap() == 2  # the policy, one judge
    assert cap("bfloat16") == 3  # + the bf16 inference copy
    assert cap(beta=0.1) == 3  # + the KL reference
    assert cap(evaluators=[*one, {"name": "self", "model": "policy@initial"}], beta=0.1) == 3  # the same model
    assert cap(evaluators=[*one, {"name": "live", "model": "policy"}]) == 2  # the live self is the policy
    assert cap(evaluators=[*one, {"name": "again", "model": judge}]) == 2  # one model judging twice
    assert cap(evaluators=[*one, {"name": "half", "model": judge, "dtype": "bfloat16"}]) == 3  # another dtype
    assert cap(beta=0.1, lora={"r": 4}) == 2  # LoRA: the base with adapters off is the reference


@pytest.mark.parametrize("live_self_on_hf", [False, True])
def test_a_policy_vllm_generates_keeps_no_half_copy(tmp_path, tiny_models, live_self_on_hf):
    """With vLLM generating, the update's fp32 master is all the pool keeps of a bf16 policy: the engine
    takes the master's tensors (cast as they are pushed). A live-self evaluator judging on hf still reads
    the bf16 weights, so there the copy is made."""
    from rlme_pipeline.backends.session import Backends
    from rlme_pipeline.jobs.policy_update import Updated
    from rlme_pipeline.jobs.train import Runner
    from rlme_pipeline.models.weights_at import initial_policy

    evaluators = [{"name": "other", "model": str(tiny_models["evaluator"])}]
    evaluators += [{"name": "live", "model": "policy"}] if live_self_on_hf else []
    d = _config(tmp_path, tiny_models, "bfloat16", evaluators, beta=0.0).model_dump(mode="json")
    d["generation"]["backend"] = "vllm"
    cfg = validate_config(d)
    run = Run.for_config(cfg)
    run.open(cfg)
    with Backends(cfg.vllm_settings(), pool_capacity(cfg)) as backends:
        runner = Runner(cfg, run, backends)
        ref = initial_policy(cfg)
        lm, _, _ = runner._trainee(ref, 0)
        done = Updated(optimizer=None, files=[], taken=None, metrics={}, rng=None)
        runner._keep_trained(ref, lm, done, "trained", str(tmp_path / "checkpoint"))
        kept = {
            (dtype, loaded.version)
            for (path, dtype, _), loaded in backends.pool._items.items()
            if path.endswith("checkpoint")
        }
    assert kept == ({("float32", "trained"), ("bfloat16", "trained")} if live_self_on_hf else {("float32", "trained")})
    assert pool_capacity(cfg) == (3 if live_self_on_hf else 2)  # the judge, the master (and the copy)
