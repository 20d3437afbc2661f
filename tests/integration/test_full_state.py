"""checkpoint.full_every: light checkpoints (weights only) between full training states; a resume replays the
updates since the last full state and ends with the uninterrupted run's bytes; a replay that does not
reproduce the committed weights is refused on a CPU; retention never prunes what a replay needs; SIGTERM
writes the full state. checkpoint.background_write: the checkpoint written while the next iteration samples,
byte-identical, and no record of iteration i+1 before MANIFEST(i)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import yaml

from rlme_pipeline.config import ConfigError, validate_config
from rlme_pipeline.jobs import replay
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage import crash, retention
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store
from rlme_pipeline.storage.verify import verify
from tests.conftest import ROOT, demo_dict


class Killed(BaseException):
    """The crash hook's SIGKILL, caught in-process (crash.os.kill raises it instead)."""


def micro(storage: str, iterations: int, dtype: str = "float32", **ckpt) -> dict:
    """2 prompts x 2 samples, one frozen-other judge, no probe, no eval: seconds per iteration."""
    d = demo_dict()
    d["run"].update(id="full", storage=storage, iterations=iterations)
    d["data"].update(prompts_per_iteration=2)
    d["evaluators"], d["questions"] = d["evaluators"][:1], d["questions"][:1]
    d["generation"].update(group_size=2, max_new_tokens=8)
    d["policy"]["dtype"] = dtype
    d.pop("eval", None)
    d["probe"]["every"] = 0
    if ckpt:
        d["checkpoint"] = ckpt
    return d


def contents(run: Run) -> dict[str, str]:
    return {f.logical: f.sha256 for i in run.committed() for f in run.manifest(i).files}


def weights(run: Run) -> dict[int, str]:
    return {i: checkpoint.weights_entry(checkpoint.files_of(run.manifest(i).files, i)).sha256 for i in run.committed()}


def full_states(run: Run) -> list[int]:
    return [i for i in run.committed() if checkpoint.is_full(checkpoint.files_of(run.manifest(i).files, i))]


def crash_at(monkeypatch, point: str, cfg, run: Run) -> None:
    """Train until the crash hook fires at `point` (in this process, in the main thread)."""

    def kill(pid, sig):
        raise Killed

    monkeypatch.setattr(crash.os, "kill", kill)
    monkeypatch.setenv("RLME_CRASH_AT", point)
    with pytest.raises(Killed):
        train(cfg, run)
    monkeypatch.delenv("RLME_CRASH_AT")


def safetensors_dtypes(path: str) -> set[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture
def reference(tiny_models, tmp_path) -> Run:
    """4 iterations, the full state every iteration (today's checkpoints)."""
    cfg = validate_config(micro(str(tmp_path / "ref"), 4))
    train(cfg, run := Run.for_config(cfg))
    return run


def test_light_checkpoints_resume_by_replay_to_the_uninterrupted_bytes(reference, tmp_path, monkeypatch):
    cfg = validate_config(micro(str(tmp_path / "light"), 4, full_every=3))
    run = Run.for_config(cfg)
    crash_at(monkeypatch, "generate:mid@2", cfg, run)  # 0 and 1 committed, both light
    assert run.committed() == [0, 1] and full_states(run) == []
    made = train(cfg, run)

    assert full_states(run) == [2, 3]  # every 3rd (i = 2) and the last of the call's target (i = 3)
    assert weights(run) == weights(reference)  # the same policy at every iteration
    light, full = contents(run), contents(reference)
    assert {k for k in full if k not in light} == {
        f"iter-00000{i}/checkpoint/{name}"
        for i in (0, 1)
        for name in ("optimizer/state.json", "optimizer/tensors-00001-of-00001.safetensors", "rng.safetensors")
    }
    assert all(full[k] == v for k, v in light.items())  # and every other file byte for byte
    assert [m.metrics.get("replayed_updates") for m in made] == [2, None]  # update 2 replayed 0 and 1
    assert verify(run).ok


def test_a_half_precision_policy_writes_light_checkpoints_in_its_dtype(tiny_models, tmp_path, monkeypatch):
    ref_cfg = validate_config(micro(str(tmp_path / "ref"), 3, dtype="bfloat16"))
    train(ref_cfg, ref := Run.for_config(ref_cfg))
    cfg = validate_config(micro(str(tmp_path / "bf16"), 3, dtype="bfloat16", full_every=2))
    run = Run.for_config(cfg)
    crash_at(monkeypatch, "score:mid@1", cfg, run)
    train(cfg, run)  # update 1 replays update 0 (a bf16 file: checked against the master rounded to bf16)

    def dtypes(r: Run, i: int) -> set[str]:
        return safetensors_dtypes(r.store.abs(r.path(i, "checkpoint/model.safetensors")))

    assert full_states(run) == [1, 2] and full_states(ref) == [0, 1, 2]
    assert dtypes(run, 0) == {"BF16"} and dtypes(run, 1) == dtypes(ref, 0) == {"F32"}  # 2 bytes/param, not 4
    assert [weights(run)[i] for i in (1, 2)] == [weights(ref)[i] for i in (1, 2)]  # the same fp32 masters
    for i in (0, 1, 2):  # what the policy generated and was judged with is the same
        assert (
            run.read_table(i, "rollouts.parquet")
            .drop("policy_version")
            .equals(ref.read_table(i, "rollouts.parquet").drop("policy_version"))
        )
    assert run.read_table(2, "rewards.parquet").equals(ref.read_table(2, "rewards.parquet"))


def test_a_replay_that_does_not_reproduce_the_committed_weights_is_refused(tiny_models, tmp_path, monkeypatch):
    cfg = validate_config(micro(str(tmp_path / "r"), 4, full_every=3))
    run = Run.for_config(cfg)
    crash_at(monkeypatch, "generate:mid@2", cfg, run)
    real = replay.update_policy

    def drifting(*args, **kwargs):  # a non-deterministic update: one weight off by one step of float32
        done = real(*args, **kwargs)
        with torch.no_grad():
            p = next(args[4].model.parameters())
            p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(1.0))
        return done

    monkeypatch.setattr(replay, "update_policy", drifting)
    with pytest.raises(replay.ReplayMismatch) as e:
        train(cfg, run)
    assert "\n" not in str(e.value)
    assert "replaying the update of iteration 0 from the full state of iteration -1" in str(e.value)
    assert "checkpoint.full_every: 1" in str(e.value)
    assert run.committed() == [0, 1] and run.stage_record(2, "update") is None  # nothing trained on top


def test_the_device_decides_between_refusing_and_recording_the_drift(tmp_path):
    """CPU: sha256 or ReplayMismatch. Any other device (a GPU's backward is not bit-exact): the largest
    absolute difference from the committed weights, as a metric. The GPU branch compares host tensors here."""
    run = Run(Store(str(tmp_path / "runs")), "d")
    committed = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor([7], dtype=torch.int64)}
    entry = run.store.write_stream("w.safetensors", lambda f: checkpoint.write_safetensors(f, committed))
    replayed = {"w": torch.tensor([1.0, 2.5, 3.0]), "n": committed["n"]}
    assert replay.compare("cpu", run, 4, 2, entry, dict(committed), lambda: committed) == {}
    with pytest.raises(replay.ReplayMismatch, match="iteration 4 from the full state of iteration 2"):
        replay.compare("cpu", run, 4, 2, entry, replayed, lambda: committed)
    assert replay.compare("cuda", run, 4, 2, entry, replayed, lambda: committed) == {"replay_max_abs_diff": 0.5}
    assert replay.compare("cuda:1", run, 4, 2, entry, dict(committed), lambda: committed) == {
        "replay_max_abs_diff": 0.0
    }
    assert replay.compare("mps", run, 4, 2, entry, replayed, lambda: committed) == {"replay_max_abs_diff": 0.5}


def test_retention_keeps_the_full_state_a_replay_needs(reference, tmp_path, monkeypatch):
    rule = validate_config(micro(".", 1, keep_last=1)).checkpoint
    assert retention.kept([0, 1, 2, 3, 4], rule, last_full=2) == {2, 3, 4}
    assert retention.kept([0, 1, 2, 3, 4], rule, last_full=-1) == {0, 1, 2, 3, 4}  # replay from the initial model
    assert retention.kept([0, 1, 2, 3, 4], rule) == {4}  # every checkpoint full: the newest is enough

    cfg = validate_config(micro(str(tmp_path / "keep"), 4, full_every=2, keep_last=1))
    run = Run.for_config(cfg)
    crash_at(monkeypatch, "generate:mid@3", cfg, run)  # 0 light, 1 full, 2 light committed
    assert full_states(run) == [1] and retention.pruned_iterations(run) == [0]  # 1 and 2 stay, not only 2
    made = train(cfg, run)
    assert made[0].metrics["replayed_updates"] == 1  # update 3 replayed update 2 from the full state of 1
    assert retention.pruned_iterations(run) == [0, 1, 2] and weights(run) == weights(reference)
    assert verify(run).ok


def test_background_write_changes_no_byte_and_commits_in_order(reference, tmp_path, monkeypatch):
    """Update i's checkpoint is written while i+1 samples; every record of i+1 is written after MANIFEST(i)."""
    writes: list[str] = []
    for method in ("write_json", "create_json"):
        real = getattr(Store, method)

        def logged(self, rel, *a, _real=real, **k):
            writes.append(rel)
            return _real(self, rel, *a, **k)

        monkeypatch.setattr(Store, method, logged)
    cfg = validate_config(micro(str(tmp_path / "bg"), 4, background_write=True))
    made = train(cfg, run := Run.for_config(cfg))

    assert contents(run) == contents(reference)
    assert all("sampled_ahead_seconds" in m.metrics for m in made[1:])  # 1..3 sampled before the commit before
    assert all(m.metrics["checkpoint_write_seconds"] >= m.metrics["checkpoint_wait_seconds"] >= 0 for m in made)
    order = [w for w in writes if w.startswith("iter-")]
    for i in range(3):
        manifest = order.index(f"iter-00000{i}/MANIFEST.json")
        later = [n for n, w in enumerate(order) if w.startswith(f"iter-00000{i + 1}/")]
        assert later and min(later) > manifest, order
    assert order.index("iter-000000/stages/update.json") < order.index("iter-000000/MANIFEST.json")


def test_full_every_checks(tiny_models):
    d = micro(".", 2)
    assert validate_config({**d, "checkpoint": {"full_every": 5, "background_write": True}}).hash() == (
        validate_config(d).hash()
    )  # operational: it changes what is written, not what is computed
    with pytest.raises(ConfigError, match=r"checkpoint.full_every: .*set checkpoint.full_every: 1$"):
        validate_config({**d, "checkpoint": {"full_every": 2}, "distributed": {"processes": 2}})
    with pytest.raises(ConfigError, match="checkpoint.full_every: a LoRA checkpoint"):
        validate_config({**d, "checkpoint": {"full_every": 2}, "policy": {**d["policy"], "lora": {"r": 4}}})
    with pytest.raises(ConfigError, match="checkpoint.full_every"):
        validate_config({**d, "checkpoint": {"full_every": 0}})


@pytest.mark.parametrize("background", [False, True])
def test_sigterm_in_an_update_writes_the_full_state_and_stops(reference, tmp_path, background):
    """SIGTERM during update 1 (full_every 3: a light checkpoint was due): the update finishes with the full
    state, the iteration is committed, nothing of iteration 2 starts, the process ends as SIGTERM ends it,
    and the next process continues without a replay."""
    d = micro(str(tmp_path / "term"), 4, full_every=3, background_write=background)
    path = tmp_path / "term.yaml"
    path.write_text(yaml.safe_dump(d))
    script = (
        "import sys; from rlme_pipeline.config import load_config; from rlme_pipeline.storage.run import Run; "
        "from rlme_pipeline.jobs.train import train; cfg = load_config(sys.argv[1]); train(cfg, Run.for_config(cfg))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLME_CRASH_AT": "update:mid@1", "RLME_CRASH_SIGNAL": "TERM"}
    p = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True)
    assert p.returncode == -15, p.stderr[-3000:]
    assert "SIGTERM: finishing the step in progress" in p.stderr and "stopped on SIGTERM" in p.stderr
    cfg = validate_config(d)
    run = Run.for_config(cfg)
    assert run.committed() == [0, 1] and full_states(run) == [1]
    assert not run.store.exists("iter-000002")
    made = train(cfg, run)
    assert all("replayed_updates" not in m.metrics for m in made)
    assert full_states(run) == [1, 2, 3] and weights(run) == weights(reference)
