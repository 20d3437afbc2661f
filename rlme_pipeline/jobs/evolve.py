"""The evolve job: propose, re-score and rank edited meta-question sets for a run (docs/evolve.md), and its
step inside training (config `evolve:`, as in MPO).

    prepare   evidence from the run, drafts from the proposer, each parsed (evolve/proposal.py)
    measure   the current set and each accepted draft: re-scored (the re-score job) and measured
    finish    ranked, the choice recorded, the proposal committed

`rlme evolve` (flows/evolve.py, each step a Prefect task) and the training loop's evolve step both run
`evolve`. Every step records itself in the proposal's directory, so a rerun continues where it stopped
and asks the proposer nothing twice.

Online: after a due iteration i is committed, the training loop runs the job on the latest committed
iterations as proposal `online-{i:06d}` and adopts the winner as the next phase, from iteration i + 1
(storage/phases.py); a proposal that keeps the current questions adopts nothing. The runner runs the step
again after a resume until iteration i + 1 is committed; done, it is a manifest read, so a resumed run
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial

from rlme_pipeline import seeds
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import RULES, Config, ProposerConfig
from rlme_pipeline.evolve import adopt, proposal, rank
from rlme_pipeline.jobs.hooks import Wrap, no_wrap
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.steps import EVOLVE
from rlme_pipeline.storage import phases
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.run import Manifest, Run, StageRecord


def evolve(
    run: Run,
    name: str,
    proposer: ProposerConfig,
    candidates: int = 4,
    iterations: str | None = None,
    probe_prompts: int = 4,
    criteria: rank.Criteria | None = None,
    backends: Backends | None = None,
    wrap: Wrap = no_wrap,
) -> proposal.ProposalManifest:
    """The committed proposal {run}/proposals/{name}. The question sets are measured one after another:
    each re-scores every stored rollout of `iterations`, with one set of models (`backends`, or this
    call's own). A proposal of that name that is committed already is refused (ProposalExists): a new
    proposal needs a new name; one that is not continues where it stopped."""
    with nullcontext(backends) if backends is not None else Backends(run.config().vllm_settings()) as b:
        prepare = partial(proposal.prepare, run, name, proposer, candidates, iterations, probe_prompts, b)
        info = wrap("evolve-prepare", prepare)()
        for k in [proposal.CURRENT, *info["accepted"]]:
            measure = partial(proposal.measure, run, name, k, b, partial(rescore, backends=b))
            wrap(f"evolve-measure-{k}", measure)()
    return wrap("evolve-finish", partial(proposal.finish, run, name, criteria))()


# --- the step inside training -----------------------------------------------------------------------
def online_name(i: int) -> str:
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


def online_proposer(cfg: Config, i: int) -> ProposerConfig:
    ev = cfg.evolve
    model = ev.proposer if ev.proposer == RULES else cfg.resolve(ev.proposer)  # relative to the config's folder
    return ev.proposer_config(model, seed=seeds.derive(cfg.run.seed, "evolve", i))  # reproducible per step


def online_step(run: Run, cfg: Config, i: int, why: str, backends: Backends) -> StageRecord:
    """Propose, measure, rank on iterations i - window + 1 .. i, and adopt the winner from i + 1. The
    returned record is the step's summary (the Prefect task's result); the run holds the real records."""
    t0, ev, n = time.perf_counter(), cfg.evolve, online_name(i)
    window = f"{max(0, i + 1 - ev.window)}:{i + 1}"
    if (u := proposal.unit(run, n)).committed():  # a resumed step: its proposal stands
        m = u.manifest()
    else:
        m = evolve(run, n, online_proposer(cfg, i), ev.candidates, window, ev.probe_prompts, backends=backends)
    crash_point("evolve:before-phase", i)
    p = None
    if m.chosen is not None:
        p = phases.adopt(run, adopt.from_proposal(run, n, f"{run.url}/proposals/{n}"))
    applies = phases.read(run, cfg.questions).at(i + 1)
    return StageRecord(
        stage=EVOLVE,
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
