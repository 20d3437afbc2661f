"""Two training iterations with generation and scoring on a managed vLLM server (openai backend).

One run, three acceptance checks:
1. the managed server is killed mid-stage (iteration 1's generate) with no restart allowed: the stage
   fails with a clear BackendError, nothing of it is recorded, iteration 0 stays committed;
2. resuming with one restart allowed, the server is killed again mid-stage: the client's retries restart
   it, the stage completes, the run reaches 2 committed iterations (iteration 1 generates from
   checkpoint 0: the policy update reached the generator);
3. the run's scores equal the hf backend's on the same rollouts, and the trainer's log-probs equal the
   vLLM behaviour log-probs (behavior_mismatch), within TOL.
"""

from __future__ import annotations

import polars as pl
import pytest

from tests.backends.conftest import SERVER_ARGS, VLLM_ENV
from tests.backends.test_contract import TOL
from tests.conftest import demo_dict


def _cfg(tmp_path, vllm_python, max_restarts: int):
    from rlme_pipeline.config import validate_config

    d = demo_dict()
    d["run"].update(id="vllm-run", storage=str(tmp_path / "runs"), iterations=2)
    d["data"].update(prompts_per_iteration=2)
    d["evaluators"] = [{"name": "self", "model": "policy"}]  # live self: scored by this iteration's policy
    d["questions"] = d["questions"][:1]
    d.pop("eval", None)  # no held-out eval: not what this test is about
    d["generation"].update(backend="openai", group_size=2, max_new_tokens=8, batch_size=2)
    d["scoring"].update(backend="openai")
    d["vllm"] = {
        "python": vllm_python,
        "server_args": SERVER_ARGS,
        "env": VLLM_ENV,
        "keep_alive": True,
        "max_restarts": max_restarts,
        "retries": 2,
        "backoff_s": 0.5,
        "timeout_s": 60,
    }
    return validate_config(d)


@pytest.fixture
def opened(monkeypatch):
    """Every Backends the runner opens, so a test can reach the server a stage is using; all closed after."""
    from rlme_pipeline.backends.session import Backends
    from rlme_pipeline.jobs import train as runner

    seen = []

    class Recorded(Backends):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(runner, "Backends", Recorded)
    yield seen
    for b in seen:
        b.close()


def _kill_server_at(monkeypatch, opened: list, point: str, iteration: int):
    """Replace generate's crash hook: SIGKILL the vLLM server group the stage is using, once."""
    from rlme_pipeline.stages import generate

    fired = []

    def hook(name, it=None):
        if name == point and it == iteration and not fired:
            fired.append(True)
            opened[-1].in_use[-1].kill()

    monkeypatch.setattr(generate, "crash_point", hook)
    return fired


def test_two_iterations_on_vllm_server(tmp_path, vllm_python, tiny_models, monkeypatch, opened, backends):
    from rlme_pipeline.backends import BackendError
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.judging.judges import evaluators_at, score_rollouts
    from rlme_pipeline.models.weights_at import policy_at
    from rlme_pipeline.storage.run import Run
    from rlme_pipeline.storage.store import Store

    # 1. killed mid-stage, no restart allowed: a clear failure and a resumable run
    cfg = _cfg(tmp_path, vllm_python, max_restarts=0)
    run = Run(Store(cfg.run.storage), cfg.run.id)
    fired = _kill_server_at(monkeypatch, opened, "generate:mid", 1)
    with pytest.raises(BackendError, match="died"):
        train(cfg, run)
    assert fired and run.committed() == [0]
    assert run.stage_record(1, "generate") is None

    # 2. resume; killed again, one restart allowed: the stage restarts the server and completes
    cfg = _cfg(tmp_path, vllm_python, max_restarts=1)  # vllm section is not hashed: the same run resumes
    fired = _kill_server_at(monkeypatch, opened, "generate:mid", 1)
    train(cfg, run)
    assert fired and run.committed() == [0, 1]
    gen1 = run.stage_record(1, "generate").metrics
    # killed between batches: the next request finds it dead and restarts it before sending (no retry needed)
    assert gen1["backend_restarts"] == 1
    print(
        "server start (reload) seconds per iteration:",
        [run.stage_record(i, "generate").metrics.get("backend_start_seconds") for i in (0, 1)],
    )

    r0, r1 = (run.read_table(i, "rollouts.parquet") for i in (0, 1))
    assert (
        r1["policy_version"].unique().to_list()
        == [policy_at(run, cfg, 1).version]
        != r0["policy_version"].unique().to_list()
    )

    # 3. the same numbers as the hf backend on the same rollouts
    for i in (0, 1):
        rollouts, served = run.read_table(i, "rollouts.parquet"), run.read_table(i, "scores.parquet")
        assert (served["status"] == "ok").all()
        hf_cfg = cfg.scoring.model_copy(update={"backend": "hf"})
        ref = score_rollouts(rollouts, evaluators_at(run, cfg, i), cfg.questions, hf_cfg, "train", backends)
        both = served.join(ref, on=["rollout_id", "evaluator", "question_id"], suffix="_hf")
        assert both.height == served.height == rollouts.height
        worst = both.select(
            pl.max_horizontal(
                (pl.col("logp_yes") - pl.col("logp_yes_hf")).abs(), (pl.col("logp_no") - pl.col("logp_no_hf")).abs()
            ).max()
        ).item()
        mismatch = run.stage_record(i, "update").metrics["behavior_mismatch"]
        print(f"iteration {i}: scores |delta logp| vs hf max {worst:.2e}; behavior_mismatch {mismatch:.2e}")
        assert worst < TOL
        assert mismatch < TOL
    assert (
        run.stage_record(0, "generate").metrics["backend_start_seconds"] > 0
    )  # the per-stage reload cost was measured
