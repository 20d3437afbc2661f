"""Evolve tasks: prepare (evidence, proposer, parse), one measure per question set, finish (rank, commit).
Inputs are URLs, names, the proposer spec as a dict and non-secret storage options (and the flow's
Backends, shared with the measure tasks as the re-score shares them); outputs small dicts. Every step
records itself in the proposal's directory, so a rerun continues where it stopped (cache_policy=NONE)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.evolve import proposal
from rlme_pipeline.evolve.propose import ProposerSpec
from rlme_pipeline.storage.run import Run


@task(name="evolve-prepare", cache_policy=NONE)
def prepare_task(
    run_uri: str,
    name: str,
    spec: dict,
    candidates: int,
    iterations: str | None,
    probe_prompts: int,
    backends: Backends,
    storage_options: dict | None = None,
) -> dict:
    run = Run.from_url(run_uri, storage_options)
    run.meta()  # a missing or copied run says so in one line
    return proposal.prepare(run, name, ProposerSpec(**spec), candidates, iterations, probe_prompts, backends)


@task(name="evolve-measure", cache_policy=NONE, task_run_name="evolve-{name}-measure-{k}")
def measure_task(run_uri: str, name: str, k, backends: Backends, storage_options: dict | None = None) -> dict:
    return proposal.measure(Run.from_url(run_uri, storage_options), name, k, backends)


@task(name="evolve-finish", cache_policy=NONE)
def finish_task(run_uri: str, name: str, storage_options: dict | None = None) -> dict:
    m = proposal.finish(Run.from_url(run_uri, storage_options), name)
    return m.model_dump(mode="json")
