"""The update across processes (FSDP2, gloo on CPU) against the one-process update on the same rollouts.

Each launch starts torchrun with 2 ranks of one thread each (about 15 s here). The micro config is set to
1-rollout micro-batches and 3 per step: 4 rollouts make a step of 3 micro-batches (rank 0 computes two,
rank 1 one plus a zero-weight pass) and a step of 1 (rank 1: only the zero-weight pass), so the uneven
shares and the padding both run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlme_pipeline.config import ConfigError, load_config
from rlme_pipeline.jobs import update_fsdp as distributed_update
from rlme_pipeline.jobs.preflight import _check_distributed
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.weights_at import policy_at
from rlme_pipeline.storage.run import Run


def _cfg(path: Path, processes: int, **changes):
    base = load_config(path)
    data = base.model_dump(mode="json")
    data["optimizer"].update(micro_batch_size=1, grad_accumulation=3)
    data["distributed"] = {"processes": processes}
    for section, fields in changes.items():
        data[section] = {**(data.get(section) or {}), **fields}
    cfg = type(base).model_validate(data)
    cfg._base_dir = base._base_dir
    return cfg


def _dir(run: Run, files) -> Path:
    return Path(run.store.local_path(checkpoint.weights_entry(files).path.rpartition("/")[0]))


def _optimizer(path: Path) -> tuple[dict, dict]:
    """(state.json with the tensor names, every tensor by name)."""
    doc = json.loads((path / checkpoint.OPTIMIZER_STATE).read_text())
    tensors = {}
    for shard in doc["shards"]:
        tensors.update(load_file(path / "optimizer" / shard))
    return doc["state_dict"], tensors


@pytest.mark.parametrize(
    "algorithm,iterations",
    [
        ({"loss": "cispo"}, 2),  # iteration 1 also loads the optimizer state into the shards
        ({"loss": "grpo", "beta": 0.1}, 1),  # per-sequence weights, and the KL reference sharded too
    ],
)
def test_a_two_process_update_equals_the_one_process_update(micro_config, tmp_path, algorithm, iterations):
    path = micro_config(str(tmp_path / "runs"), iterations=iterations)
    one = _cfg(path, 1, algorithm=algorithm)
    run = Run.for_config(one)
    train(one, run)  # the reference: the updates in this process, on rollouts the run keeps

    for i in range(iterations):
        start = policy_at(run, one, i)
        files, metrics = distributed_update.launch(_cfg(path, 2, algorithm=algorithm), run, i, start.path)
        ref = run.read_record(i, "update")
        a, b = _dir(run, ref.files), _dir(run, files)
        assert a != b  # a second checkpoint of the same iteration, beside the committed one

        assert metrics["loss"] == pytest.approx(ref.metrics["loss"], abs=1e-6)
        assert metrics["grad_norm"] == pytest.approx(ref.metrics["grad_norm"], rel=1e-4)  # fp32 norms, other order
        for k in ("optimizer_steps", "trained_rollouts", "masked_rollouts", "clip_ratio"):
            assert metrics[k] == ref.metrics[k]
        assert metrics["behavior_mismatch"] == pytest.approx(ref.metrics["behavior_mismatch"], abs=1e-6)

        before = load_file(Path(start.path) / checkpoint.WEIGHTS)
        wa, wb = load_file(a / checkpoint.WEIGHTS), load_file(b / checkpoint.WEIGHTS)
        assert list(wa) == list(wb)
        assert max((wa[k] - before[k]).abs().max().item() for k in wa) > 5e-5  # the step moved more than 1e-5
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5

        (sa, ta), (sb, tb) = _optimizer(a), _optimizer(b)
        assert sa == sb  # the same structure: parameter indices, param groups, tensor names
        assert all(torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-7) for k in ta)
        for name in ("config.json", "tokenizer.json", checkpoint.STATE):
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_a_two_process_run_trains_and_resumes_exactly(micro_config, tmp_path):
    path = micro_config(str(tmp_path / "runs"), iterations=2)
    whole = _cfg(path, 2)
    straight = Run.for_config(whole)
    train(whole, straight)

    resumed_cfg = _cfg(path, 2, run={"storage": str(tmp_path / "resumed"), "iterations": 1})
    resumed = Run.for_config(resumed_cfg)
    train(resumed_cfg, resumed)
    assert resumed.committed() == [0]
    train(resumed_cfg.with_overrides(iterations=2), resumed)  # a new process would do the same: nothing in memory

    for i in (0, 1):
        m, r = straight.manifest(i), resumed.manifest(i)
        assert m.lineage["update_processes"] == r.lineage["update_processes"] == 2
        assert m.lineage["policy_after"] == r.lineage["policy_after"]  # same process count: the same bytes
        assert m.lineage["policy_after"] != m.lineage["policy_before"]
        assert {f.logical: f.sha256 for f in m.files} == {f.logical: f.sha256 for f in r.files}
    assert straight.manifest(1).lineage["policy_before"] == straight.manifest(0).lineage["policy_after"]


def test_lora_with_processes_is_refused_in_one_line(micro_config, tmp_path):
    cfg = _cfg(micro_config(str(tmp_path / "runs")), 2, policy={"lora": {"r": 4}})
    with pytest.raises(ConfigError, match=r"^distributed.processes: 2 shards full fine-tuning only.*processes: 1"):
        _check_distributed(cfg)


def test_more_processes_than_gpus_is_refused_in_one_line(micro_config, tmp_path, monkeypatch):
    # A machine with one GPU cannot be made here: torch is told it has one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = micro_config(str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=r"^distributed.processes: 2 but this machine has 1 GPU\(s\)"):
        _check_distributed(_cfg(path, 2, policy={"device": "cuda"}))
    with pytest.raises(ConfigError, match=r"^policy.device: 'cuda:1' names one GPU"):
        _check_distributed(_cfg(path, 2, policy={"device": "cuda:1"}))
    _check_distributed(_cfg(path, 2))  # cpu: gloo, for tests
