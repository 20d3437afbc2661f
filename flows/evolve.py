"""rlme_evolve: propose, re-score and rank edited meta-question sets for a run, into {run}/proposals/{name}/
(docs/evolve.md); the run's training data is untouched, each candidate gets its own score set."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from rlme_flows.config_io import public_options
from rlme_flows.train import artifact_key
from rlme_tasks.evolve import finish_task, measure_task, prepare_task

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.evolve.proposal import CURRENT
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
    """proposer: the fields of rlme_pipeline.evolve.propose.ProposerSpec ({"model": "rules"} or a model
    reference with its backend). The question sets are measured one after another: each re-scores every
    stored rollout, and they share the flow's models."""
    log = get_run_logger()
    opts = public_options(storage_options)
    with Backends(Run.from_url(run_uri, opts).config().vllm_settings()) as backends:
        info = prepare_task(run_uri, name, proposer, candidates, iterations, probe_prompts, backends, opts)
        log.info("proposal %s: %d of %d drafts accepted", name, len(info["accepted"]), info["drafts"])
        for k in [CURRENT, *info["accepted"]]:
            measure_task(run_uri, name, k, backends, opts)
    m = finish_task(run_uri, name, opts)
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
