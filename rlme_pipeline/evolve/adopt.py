"""What `rlme train CONFIG --adopt REF` reads: a committed proposal's chosen set ({run}/proposals/{name})
or a questions file (a YAML list, or a mapping with `questions:`, as `rlme rescore --questions` reads).
Every mistake is one line naming the reference and the fix, before anything starts; the phase itself is
recorded by phases.adopt, inside the run's lease."""

from __future__ import annotations

from rlme_pipeline import scoreset
from rlme_pipeline.config import Config, ConfigError, QuestionConfig
from rlme_pipeline.evolve import proposal
from rlme_pipeline.storage.phases import Adoption, questions_sha
from rlme_pipeline.storage.run import MANIFEST, CorruptRun, Run


def proposal_ref(ref: str) -> tuple[str, str] | None:
    """(run URL, proposal name) when ref names a proposal directory: {storage}/{run_id}/proposals/{name}."""
    head, _, name = ref.rstrip("/").rpartition("/")
    run_url, _, leaf = head.rpartition("/")
    return (run_url, name) if leaf == "proposals" and run_url and name else None


def _questions(path: str, ref: str, storage_options: dict | None) -> list[QuestionConfig]:
    """scoreset.load_questions, its errors naming --adopt (the flag the user gave)."""
    try:
        return scoreset.load_questions(path, storage_options)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"--questions {path}", f"--adopt {ref}", 1)) from None


def from_proposal(run: Run, name: str, ref: str, storage_options: dict | None = None) -> Adoption:
    u = proposal.unit(run, name)
    if not u.committed():
        raise ConfigError(
            f"--adopt {ref}: no committed proposal there; finish it with `rlme evolve {run.url} --name {name}`"
        )
    m = u.manifest()
    if m.chosen is None:
        raise ConfigError(f"--adopt {ref}: the proposal chose no set ({m.why}); there is nothing to adopt")
    entry = u.entry("chosen.yaml")
    if run.store.sha256(entry.path) != entry.sha256:
        raise CorruptRun(f"--adopt {ref}: {run.store.where(entry.path)} does not match its manifest")
    questions = _questions(run.store.where(entry.path), ref, storage_options)
    source = {
        "kind": "proposal",
        "run_id": m.run_id,
        "name": name,
        "manifest_sha256": run.store.sha256(u.rel(MANIFEST)),
        "candidate": m.chosen,
    }
    against = questions_sha([QuestionConfig.model_validate(q) for q in m.current["questions"]])
    return Adoption(questions, source, run_id=m.run_id, against=against)


def load(ref: str, storage_options: dict | None = None) -> Adoption:
    """The set `ref` names, validated like config questions."""
    if (p := proposal_ref(ref)) is not None:
        run_url, name = p
        try:
            run = Run.from_url(run_url, storage_options)
            run.meta()
        except ValueError as e:
            raise ConfigError(f"--adopt {ref}: {e}") from None
        return from_proposal(run, name, ref, storage_options)
    return Adoption(_questions(ref, ref, storage_options), {"kind": "file", "path": ref})


def judged_with(cfg: Config, adopted: Adoption | None) -> Config:
    """The config whose questions preflight checks (each answer one token for every evaluator)."""
    return cfg if adopted is None else cfg.model_copy(update={"questions": list(adopted.questions)})
