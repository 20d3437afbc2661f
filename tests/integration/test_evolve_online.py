"""Online evolution (config `evolve:`, jobs/evolve.py): the training loop proposes, ranks and adopts
question sets as phases by itself, every N iterations and on the probe alarm; a kill between the committed
proposal and its phase resumes to exactly the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlme_pipeline.config import ConfigError, load_config, validate_config
from rlme_pipeline.evolve import proposal
from rlme_pipeline.jobs import evolve as evolving
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.jobs.train import train
from rlme_pipeline.storage import phases
from rlme_pipeline.storage.run import Run, RunMismatch
from tests.conftest import ROOT


def micro(micro_config, storage: Path, iterations: int, **sections) -> Path:
    path = micro_config(str(storage), iterations=iterations)
    d = yaml.safe_load(path.read_text())
    d.update(sections)
    path.write_text(yaml.safe_dump(d))
    return path


def contents(run: Run) -> dict[str, str]:
    """What the run computed: every committed file by logical name, the phases, the proposals' choices."""
    out = {f.logical: f.sha256 for i in run.committed() for f in run.manifest(i).files}
    for p in phases.read(run).all:
        out[f"phase {p.phase}"] = json.dumps([p.from_iteration, p.questions_sha, p.source.get("name")])
    for n in proposal.names(run):
        u = proposal.unit(run, n)
        out |= {f.logical: f.sha256 for f in u.manifest().files}
    return out


def train_process(config: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """`rlme train` (the Prefect flow, its steps as tasks), or, to be killed, the bare training loop: a
    killed CLI would leave its temporary Prefect server behind."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RLME_CRASH_AT", None)
    cmd = [sys.executable, "-m", "rlme_flows.cli", "train", str(config)]
    if crash_at:
        env["RLME_CRASH_AT"] = crash_at
        code = (
            "import sys; from rlme_pipeline.config import load_config as L; from rlme_pipeline.storage.run import Run; "
        )
        code += "from rlme_pipeline.jobs.train import train; c = L(sys.argv[1]); train(c, Run.for_config(c))"
        cmd = [sys.executable, "-c", code, str(config)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_online_evolve_adopts_phases_and_a_kill_resumes_exactly(micro_config, tmp_path):
    evolve = {"evolve": {"every": 2, "candidates": 3, "window": 2}}
    ref_cfg = load_config(micro(micro_config, tmp_path / "ref", 4, **evolve))
    ref = Run.for_config(ref_cfg)
    train(ref_cfg, ref)

    # after iterations 1 and 3 (every 2): a proposal each, over the two latest iterations
    assert sorted(proposal.names(ref)) == [evolving.online_name(1), evolving.online_name(3)]
    first = proposal.unit(ref, evolving.online_name(1)).manifest()
    assert first.iterations == [0, 1] and first.chosen is not None, first.why
    ps = phases.read(ref)
    assert (ps.all[1].from_iteration, ps.all[1].source["name"]) == (2, evolving.online_name(1))
    assert [ref.manifest(i).lineage["phase"] for i in range(4)] == [0, 0, 1, 1]
    # the second proposal edits phase 1's questions; one that keeps them adopts nothing
    second = proposal.unit(ref, evolving.online_name(3)).manifest()
    assert second.current["questions"] == [q.model_dump(mode="json") for q in ps.all[1].questions]
    assert len(ps.all) == (2 if second.chosen is None else 3)

    # the same run killed after the first proposal's commit, before its phase; resumed by the CLI's flow
    config = micro(micro_config, tmp_path / "killed", 4, **evolve)
    run = Run.for_config(load_config(config))
    p = train_process(config, crash_at="evolve:before-phase@1")
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    assert proposal.unit(run, evolving.online_name(1)).committed() and len(phases.read(run).all) == 1
    assert run.committed() == [0, 1]
    p = train_process(config)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert run.committed() == [0, 1, 2, 3]
    got, want = contents(run), contents(ref)
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k] != want[k] and not k.endswith("MANIFEST.json")]  # proposals' commit times
    assert not differ, differ


def test_online_evolve_runs_on_the_probe_alarm(micro_config, tmp_path):
    """alarm_share 0: an alarm whenever an evaluator judges any probe answer positive."""
    config = micro(
        micro_config,
        tmp_path,
        2,
        evolve={"on_probe_alarm": True, "candidates": 2, "window": 1},
        probe={"every": 1, "prompts": 2, "alarm_share": 0.0},
    )
    cfg = load_config(config)
    run = Run.for_config(cfg)
    train(cfg, run)
    alarms = [i for i in run.committed() if run.manifest(i).metrics.get("probe/alarm")]
    assert alarms, "the tiny judges call some empty answer good"
    assert sorted(proposal.names(run)) == [evolving.online_name(i) for i in alarms]
    assert proposal.unit(run, evolving.online_name(alarms[0])).manifest().iterations == [alarms[0]]


def test_evolve_section_errors_and_hash(micro_config, tmp_path):
    d = yaml.safe_load(micro(micro_config, tmp_path, 1).read_text())
    base = validate_config(d)
    with pytest.raises(ConfigError, match="evolve: set every >= 1 or on_probe_alarm: true"):
        validate_config({**d, "evolve": {"proposer": "rules"}})
    with_evolve = validate_config({**d, "evolve": {"every": 3}})
    assert with_evolve.hash() != base.hash()  # it decides later iterations' questions: an experiment field
    alarm_only = validate_config({**d, "evolve": {"on_probe_alarm": True}, "probe": {"every": 0}})
    with pytest.raises(ConfigError, match=r"evolve\.on_probe_alarm: the probe is off"):
        preflight(alarm_only, Run.for_config(alarm_only).root)
    with pytest.raises(ConfigError, match=r"evolve\.proposer"):
        preflight(
            validate_config({**d, "evolve": {"every": 1, "proposer": "./no-such-model"}}), Run.for_config(base).root
        )
    live = {**d, "evaluators": [{"name": "live", "model": "policy"}], "checkpoint": {"keep_last": 2}}
    with pytest.raises(ConfigError, match=r"evolve\.window 2 .* checkpoint\.keep_last is 2: raise it to 3"):
        preflight(validate_config({**live, "evolve": {"every": 1}}), Run.for_config(base).root)
    preflight(validate_config({**live, "evolve": {"every": 1, "window": 1}}), Run.for_config(base).root)
    # switching it on in a running run is a changed experiment, refused naming the section
    run = Run.for_config(base)
    run.open(base)
    with pytest.raises(RunMismatch, match="evolve"):
        run.check(with_evolve)
