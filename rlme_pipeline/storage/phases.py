"""Question-set phases of a training run: from iteration i on, the run trains with another set of
meta-questions, adopted explicitly (`rlme train CONFIG --adopt ...`) or by the online evolve step.

    {run}/phases/phase-0001.json   one record per adopted set, created exclusively (the first stands)

Phase 0 is the run's own questions (run.json) and has no file. Phase k > 0 says: from `from_iteration` on,
score and aggregate with `questions` (the full list), adopted from `source` (a committed proposal with its
manifest's sha256, a questions file with its sha256, or the online step). The effective config of
iteration i is the run's config with the questions of the latest phase that starts at or before i; every
reader of a run's questions for one iteration asks `Phases.at(i)`: the score and aggregate stages (their
records, hence the manifests' lineage: phase, questions_sha), re-scoring with the run's own questions,
the audit and `rlme evolve`.

The one config change a resume accepts besides operational ones: a config whose questions are the latest
phase's (the user wrote the adopted set into their YAML) stands for the run's own (`resume_config`);
anything else is refused by `Run.check` as before, naming the fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from rlme_pipeline.config import Config, QuestionConfig, experiment_diff, sha256_json
from rlme_pipeline.storage.run import CorruptRun, Run, RunMismatch, now

DIR = "phases"


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    phase: int = Field(ge=0)
    from_iteration: int = Field(ge=0)
    questions: list[QuestionConfig]
    questions_sha: str
    source: dict  # kind: config | proposal | file | online, and what identifies it
    created: str


def questions_sha(questions: list[QuestionConfig]) -> str:
    """The identity of a question set: every field of every question, in order (weights included)."""
    return sha256_json([q.model_dump(mode="json") for q in questions])


def phase_rel(k: int) -> str:
    return f"{DIR}/phase-{k:04d}.json"


def _files(run: Run) -> list[str]:
    return sorted(n for n in run.store.ls(DIR) if n.startswith("phase-") and n.endswith(".json"))


@dataclass(frozen=True)
class Phases:
    """A run's phases, phase 0 first; `at(i)` is the phase iteration i trains in."""

    all: tuple[Phase, ...]

    @property
    def latest(self) -> Phase:
        return self.all[-1]

    def at(self, i: int) -> Phase:
        return [p for p in self.all if p.from_iteration <= i][-1]

    def config_at(self, cfg: Config, i: int) -> Config:
        """`cfg` with the questions iteration i is judged with (cfg itself in phase 0)."""
        p = self.at(i)
        return cfg if p.phase == 0 else cfg.model_copy(update={"questions": list(p.questions)})

    def lineage(self, i: int) -> dict:
        """What a manifest records of the phase (through the score stage's record)."""
        p = self.at(i)
        return {"phase": p.phase, "questions_sha": p.questions_sha}


def base_phase(questions: list[QuestionConfig], created: str = "") -> Phase:
    qs = list(questions)
    return Phase(phase=0, from_iteration=0, questions=qs, questions_sha=questions_sha(qs), source={"kind": "config"}, created=created)  # fmt: skip


def read(run: Run, base: list[QuestionConfig] | None = None) -> Phases:
    """The run's phases; `base` is the run's own questions (read from run.json when not given). A record
    that does not parse or does not follow its predecessor is damage, said in one line."""
    names = _files(run)
    phases = [base_phase(run.config().questions if base is None else base)]
    for k, name in enumerate(names, start=1):
        rel = f"{DIR}/{name}"
        try:
            p = Phase.model_validate(run.store.read_json(rel))
        except ValueError as e:
            raise CorruptRun(f"{run.store.where(rel)} is not a valid phase record ({str(e).splitlines()[0]})") from None
        if name != phase_rel(k).removeprefix(f"{DIR}/") or p.phase != k:
            raise CorruptRun(f"{run.store.where(rel)}: expected phase {k} here (phases are numbered 1, 2, ...)")
        if p.from_iteration <= phases[-1].from_iteration or p.questions_sha != questions_sha(p.questions):
            raise CorruptRun(f"{run.store.where(rel)}: its start or its questions_sha does not check out")
        phases.append(p)
    return Phases(tuple(phases))


# --- resuming: the config a resume is checked with ----------------------------------------------------
def resume_config(run: Run, cfg: Config) -> Config:
    """`cfg` as `Run.check` should see it: a config that asks the latest phase's questions stands for the
    run's own. A config whose questions are neither, in a run with phases, gets the fix in one line."""
    if not run.store.exists("run.json") or not _files(run):
        return cfg
    ps = read(run)
    if questions_sha(cfg.questions) == ps.latest.questions_sha:
        return cfg.model_copy(update={"questions": list(ps.all[0].questions)})
    if questions_sha(cfg.questions) != ps.all[0].questions_sha:
        changed = experiment_diff(run.config(), cfg)
        if changed and all(c.startswith("questions") for c in changed):
            raise RunMismatch(
                f"run {run.id}: the config's questions are neither the run's own (phase 0) nor those it trains with "
                f"now (phase {ps.latest.phase}, from iteration {ps.latest.from_iteration}); to train with new "
                "questions adopt them as a phase: `rlme train CONFIG --adopt FILE` (docs/evolve.md)"
            )
    return cfg


# --- adopting a question set ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adoption:
    """A question set to train with from the next iteration, and where it came from (recorded as is).
    `run_id` and `against` (the sha of the questions a proposal edited) are checked when set."""

    questions: list[QuestionConfig]
    source: dict
    run_id: str | None = None
    against: str | None = None


class AdoptionRefused(ValueError):
    pass


def first_unscored(run: Run, committed: list[int]) -> int:
    """The first iteration whose scores are not written yet: the first a new question set can judge. An
    interrupted iteration scored with the current questions keeps them (its records stand)."""
    i = max(committed) + 1 if committed else 0
    return i + 1 if run.store.exists(run.unit(i).record_rel("score")) else i


def next_phase(run: Run, adoption: Adoption, committed: list[int] | None = None) -> Phase | None:
    """The phase `adoption` would become, or why it cannot (AdoptionRefused); None when the run already
    trains with these questions (a retried flow, a resumed online step, an adopted file given again)."""
    if not run.store.exists("run.json"):
        raise AdoptionRefused(f"--adopt: run {run.id} does not exist yet; put the questions into the config instead")
    ps = read(run)
    sha = questions_sha(adoption.questions)
    if sha == ps.latest.questions_sha:
        return None
    if adoption.run_id is not None and adoption.run_id != run.id:
        raise AdoptionRefused(f"--adopt: the proposal was made for run {adoption.run_id!r}, not {run.id!r}")
    if adoption.against is not None and adoption.against != ps.latest.questions_sha:
        raise AdoptionRefused(
            f"--adopt: the proposal edited other questions than run {run.id} trains with now (phase "
            f"{ps.latest.phase}, from iteration {ps.latest.from_iteration}); make a new proposal (`rlme evolve`)"
        )
    start = first_unscored(run, run.committed() if committed is None else committed)
    if start == 0:
        raise AdoptionRefused(
            f"--adopt: run {run.id} has trained no iteration yet; put the questions into the config instead"
        )
    if start <= ps.latest.from_iteration:
        raise AdoptionRefused(
            f"--adopt: phase {ps.latest.phase} starts at iteration {start} and has trained nothing yet; train at "
            "least one iteration in it before adopting another set"
        )
    return Phase(
        phase=ps.latest.phase + 1,
        from_iteration=start,
        questions=list(adoption.questions),
        questions_sha=sha,
        source=adoption.source,
        created=now(),
    )


def adopt(run: Run, adoption: Adoption, committed: list[int] | None = None) -> Phase | None:
    """Record `adoption` as the next phase, from the first unscored iteration; call it holding the run's
    lease. The record is created exclusively: of two writers (only possible without the lease) the first
    stands. None when there is nothing to adopt (next_phase)."""
    p = next_phase(run, adoption, committed)
    if p is not None and not run.store.create_json(phase_rel(p.phase), p.model_dump(mode="json")):
        p = read(run).all[p.phase]
    return p
