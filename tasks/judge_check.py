"""The judge-check task: samples the base policy, has the configured judges grade it against the labels,
writes the tables where asked (never into a run) and returns the report's summary (a small dict).
It takes the flow's Config and Backends (in-process objects, as the rescore and evolve tasks take Backends),
hence cache_policy=NONE: nothing here is worth Prefect's input hashing, and a rerun repeats the same seeds."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config
from rlme_pipeline.judging import check
from rlme_pipeline.storage.store import Store


@task(name="judge-check", cache_policy=NONE)
def judge_check_task(
    cfg: Config,
    prompts: int,
    samples: int,
    probe_prompts: int,
    backends: Backends,
    out: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    labelled = check.check_inputs(cfg, prompts, samples)  # again: a deployment's run skips the CLI's checks
    result = check.run(cfg, labelled, samples, probe_prompts, backends)
    if out is not None:
        check.check_out(cfg, out, storage_options)
        result.summary["files"] = check.write(result, Store(out, storage_options))
    return result.summary
