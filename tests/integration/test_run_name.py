"""A run's results do not depend on its name: one config and seed under two run ids train the same policy.

Rollout ids hash the run id (they name rows across runs); nothing computed may depend on them. The update
used to order its items by rollout id before the seeded permutation, so two names trained on different
micro-batches from update 0 on and diverged from iteration 1.
"""

from __future__ import annotations

from rlme_pipeline.config import validate_config
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage.run import REWARDS_FILE, ROLLOUTS_FILE, Run
from tests.conftest import demo_dict

KEY = ["prompt_id", "sample_index"]


def _train(tmp_path, run_id: str) -> Run:
    d = demo_dict()  # configs/demo.yaml: 8 prompts x 8 samples, 4 epochs of 8 optimizer steps per iteration
    d["run"].update(id=run_id, storage=str(tmp_path / "runs"), iterations=2)
    d.pop("eval", None)  # observation only (held-out eval, the probe): not what is compared here
    d["probe"].update(every=0)
    cfg = validate_config(d)
    run = Run.for_config(cfg)
    train(cfg, run)
    return run


def _computed(run: Run, i: int) -> dict:
    """What iteration i computed, keyed by what the config determines (never by rollout id)."""
    rollouts = run.read_table(i, ROLLOUTS_FILE)
    rewards = run.read_table(i, REWARDS_FILE).join(rollouts.select("rollout_id", *KEY), on="rollout_id")
    return {
        "completions": rollouts.sort(KEY).select(*KEY, "completion_token_ids", "behavior_logprobs"),
        "advantages": rewards.sort(KEY).select(*KEY, "reward", "advantage"),
        "weights": checkpoint.weights_entry(checkpoint.files_of(run.manifest(i).files, i)).sha256,
    }


def test_two_run_ids_with_one_config_and_seed_train_the_same_policy(tmp_path):
    a, b = _train(tmp_path, "name-a"), _train(tmp_path, "name-b")
    for i in (0, 1):
        x, y = _computed(a, i), _computed(b, i)
        assert x["completions"].equals(y["completions"]), f"iteration {i}: different completions"
        assert x["advantages"].equals(y["advantages"]), f"iteration {i}: different rewards"
        assert x["weights"] == y["weights"], f"update {i}: different weights"
    ids = [set(r.read_table(0, ROLLOUTS_FILE)["rollout_id"]) for r in (a, b)]
    assert not ids[0] & ids[1]  # the ids do differ: they name rows, and nothing computed depends on them
