"""The evolve step inside training (config `evolve:`, as in MPO): after a due iteration i is committed, the
training loop proposes, measures and ranks question sets on the latest committed iterations (proposal.py)
and adopts the winner as the next phase, from iteration i + 1 (phases.py).

Its records are the run's own: the proposal `online-{i:06d}` (a write-once unit whose every step is
recorded, so a killed step continues where it stopped and asks the proposer nothing twice) and the phase
record that names that proposal as its source. A proposal that keeps the current questions adopts
nothing. The runner runs the step again after a resume until iteration i + 1 is committed; done, it is a
manifest read, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time

from rlme_pipeline import seeds
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config
from rlme_pipeline.evolve import adopt, proposal
from rlme_pipeline.evolve.propose import RULES, ProposerSpec
from rlme_pipeline.storage import phases
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.run import Manifest, Run, StageRecord

STEP = "evolve"


def name(i: int) -> str:
    return f"online-{i:06d}"


def due(cfg: Config, m: Manifest) -> str | None:
    """Why the step runs after committed iteration m.iteration ('every', 'probe alarm'), or None."""
    ev = cfg.evolve
    if ev is None:
        return None
    if ev.every and (m.iteration + 1) % ev.every == 0:
        return "every"
    if ev.on_probe_alarm and m.metrics.get("probe/alarm"):
        return "probe alarm"
    return None


def spec(cfg: Config, i: int) -> ProposerSpec:
    ev = cfg.evolve
    seed = seeds.derive(cfg.run.seed, "evolve", i)  # a model proposer's drafts: reproducible per step
    model = ev.proposer if ev.proposer == RULES else cfg.resolve(ev.proposer)  # relative to the config's folder
    return ProposerSpec(model, ev.backend, ev.dtype, ev.device, ev.max_new_tokens, ev.temperature, seed=seed)


def step(run: Run, cfg: Config, i: int, why: str, backends: Backends) -> StageRecord:
    """Propose, measure, rank on iterations i - window + 1 .. i, and adopt the winner from i + 1. The
    returned record is the step's summary (the Prefect task's result); the run holds the real records."""
    t0, ev, n = time.perf_counter(), cfg.evolve, name(i)
    if not proposal.unit(run, n).committed():
        window = f"{max(0, i + 1 - ev.window)}:{i + 1}"
        info = proposal.prepare(run, n, spec(cfg, i), ev.candidates, window, ev.probe_prompts, backends)
        for k in [proposal.CURRENT, *info["accepted"]]:
            proposal.measure(run, n, k, backends)
    m = proposal.finish(run, n)
    crash_point("evolve:before-phase", i)
    p = None
    if m.chosen is not None:
        p = phases.adopt(run, adopt.from_proposal(run, n, f"{run.url}/proposals/{n}"))
    applies = phases.read(run, cfg.questions).at(i + 1)
    return StageRecord(
        stage=STEP,
        iteration=i,
        files=[],
        seconds=time.perf_counter() - t0,
        info={
            "why": why,
            "proposal": n,
            "chosen": m.chosen,
            "reason": m.why,
            "adopted_phase": p.phase if p else None,
            "phase_next": applies.phase,
        },
    )
