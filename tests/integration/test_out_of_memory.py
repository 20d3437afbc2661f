"""Out of GPU memory inside a stage: one error naming the stage and the knobs, and the iteration resumes.

A CUDA OOM cannot be caused on a CPU machine, so the pure stage is made to raise torch.OutOfMemoryError
(what a CUDA allocation raises) at iteration 1: the one fault here that is mocked."""

from __future__ import annotations

import pytest
import torch

from rlme_pipeline.config import load_config
from rlme_pipeline.jobs import policy_update
from rlme_pipeline.jobs import train as runner
from rlme_pipeline.jobs.oom import StageOutOfMemory
from rlme_pipeline.steps import RECORDED
from rlme_pipeline.storage.run import Run
from tests.conftest import demo_variant, write_config

CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB"


def contents(run: Run) -> dict[str, str]:
    return {f.logical: f.sha256 for i in run.committed() for f in run.manifest(i).files}


# Where each step's pure function is called from (update: the trainer helper, which loaded its inputs).
CALLERS = {"generate": runner, "score": runner, "probe": runner, "update": policy_update}
PURE = {"generate": "generate", "score": "score", "probe": "run_probe", "update": "update"}


def fail_at_iteration_1(monkeypatch, stage: str, run: Run) -> None:
    """The pure stage raises a CUDA OOM in iteration 1 (once iteration 0 is committed), after the runner
    read its inputs (and, for update, took the policy out of the model pool to train it)."""
    real = getattr(CALLERS[stage], PURE[stage])

    def oom(*args, **kwargs):
        if run.committed() == [0]:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(*args, **kwargs)

    monkeypatch.setattr(CALLERS[stage], PURE[stage], oom)


def _config(tmp_path, name: str):
    """The micro demo with the probe in every iteration (its step fails in iteration 1 too)."""
    d = demo_variant(tmp_path / name, iterations=2, run_id="micro", micro=True, probe={"every": 1})
    return load_config(write_config(d, tmp_path, name))


def test_out_of_memory_in_each_stage_names_the_knobs_and_the_iteration_resumes(tiny_models, tmp_path, monkeypatch):
    reference = _config(tmp_path, "reference")
    runner.train(reference, Run.for_config(reference))

    cfg = _config(tmp_path, "oom")
    run = Run.for_config(cfg)
    knob = {  # operational knobs first (the run resumes with them), then the experiment's (a new run)
        "generate": "To fit: generation.batch_size: lower than 32, policy.lora",
        "score": "To fit: scoring.batch_size: lower than",
        "probe": "To fit: probe.prompts: lower than 2 (these keep the run: change them and resume); scoring.batch_size",
        "update": "To fit: optimizer.gradient_checkpointing: true, optimizer.logprob_chunk_tokens: lower than 256 "
        "(these keep the run: change them and resume); optimizer.micro_batch_size: lower than 8",
    }
    for stage in ("generate", "score", "probe", "update"):
        with monkeypatch.context() as m:
            fail_at_iteration_1(m, stage, run)
            with pytest.raises(StageOutOfMemory) as e:
                runner.train(cfg, run)
        msg = str(e.value)
        assert "\n" not in msg and e.value.__context__ is None and e.value.__cause__ is None
        assert msg.startswith(f"{stage} of iteration 1 ran out of GPU memory ({CUDA_OOM})"), msg
        assert f"resumes the iteration at {stage}" in msg and knob[stage] in msg, msg
        # nothing half-committed: iteration 0 stands, iteration 1 has the records of the stages before only
        assert run.committed() == [0]
        done = [s for s in RECORDED if run.stage_record(1, s) is not None]
        assert done == list(RECORDED[: RECORDED.index(stage)]), done
    runner.train(cfg, run)  # the memory is back: the run resumes where it stopped
    assert contents(run) == contents(Run.for_config(reference))
