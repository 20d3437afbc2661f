"""rlme_evolve: propose, re-score and rank edited meta-question sets for a run, into {run}/proposals/{name}/
(docs/evolve.md); the run's training data is untouched, each candidate gets its own score set."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from rlme_flows.config_io import public_options
from rlme_flows.train import artifact_key
from rlme_tasks.steps import as_tasks

from rlme_pipeline.config import ProposerConfig
from rlme_pipeline.evolve.proposal import CURRENT
from rlme_pipeline.jobs.evolve import evolve
from rlme_pipeline.storage.run import Run


@flow(name="rlme_evolve", log_prints=True)
def rlme_evolve(
    run_uri: str,
    name: str,
    proposer: dict,
    candidates: int = 4,
    iterations: str | None = None,
    probe_prompts: int = 4,
    storage_options: dict | None = None,
) -> dict:
    """The evolve job (rlme_pipeline/jobs/evolve.py), each step a task. proposer: the fields of
    rlme_pipeline.config.ProposerConfig ({"model": "rules"}, or a model reference with its backend)."""
    log = get_run_logger()
    run = Run.from_url(run_uri, public_options(storage_options))
    spec = ProposerConfig.model_validate(proposer)
    m = evolve(run, name, spec, candidates, iterations, probe_prompts, wrap=as_tasks()).model_dump(mode="json")
    accepted = sum(1 for c in m["candidates"] if c["status"] == "accepted")
    log.info("proposal %s: %d of %d drafts accepted; %s", name, accepted, len(m["candidates"]), m["why"])
    rows = [{"set": CURRENT, **m["current"]["measures"]}]
    rows += [
        {"set": c["index"], "source": c["source"], **(c["measures"] or {}), "status": c["status"]}
        for c in m["candidates"]
    ]
    create_table_artifact(
        key=f"{artifact_key(m['run_id'])}-proposal-{artifact_key(name).removeprefix('rlme-')}",
        table=rows,
        description=f"proposal {name} of {run_uri}: {m['why']}",
    )
    return {"run": run_uri, "proposal": f"{run_uri.rstrip('/')}/proposals/{name}", **m}
