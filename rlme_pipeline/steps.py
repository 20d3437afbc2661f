"""The steps of a training iteration, named once.

    generate -> score -> probe -> aggregate -> update -> eval    each writes its stage record (stages/{step}.json)
    sample                                                     the next iteration's rollouts, sampled while this
                                                               update's checkpoint is written (background_write)
    commit                                                     MANIFEST.json: the iteration exists once it does
    evolve                                                     after a commit, where the config's `evolve:` says so

`sample` writes nothing: generate writes what it sampled after the commit (checkpoint.background_write,
docs/storage.md). `probe` and `eval` run only in the iterations they are due for (config `probe.every`, `eval.every`). The
train loop (jobs/train.py) runs them in this order, the run's layout (storage/run.py) knows which records
an iteration may hold, the config (`run.stage_timeout_s`) which steps may have a timeout, and the Prefect
flow makes each a task of the same name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlme_pipeline.config import Config

GENERATE, SCORE, PROBE, AGGREGATE, UPDATE, EVAL = "generate", "score", "probe", "aggregate", "update", "eval"
SAMPLE, COMMIT, EVOLVE = "sample", "commit", "evolve"

RECORDED = (GENERATE, SCORE, PROBE, AGGREGATE, UPDATE, EVAL)  # the steps that write a stage record
STEPS = (*RECORDED, SAMPLE, COMMIT, EVOLVE)  # every step of the train loop


def due(every: int, iteration: int) -> bool:
    """An every-N step (probe, eval): iterations 0, N, 2N, ...; never with N = 0."""
    return bool(every) and iteration % every == 0


def steps_of(cfg: Config, iteration: int) -> tuple[str, ...]:
    """The recorded steps of an iteration, in order: the stages, with the probe and eval where due."""
    return tuple(
        s
        for s in RECORDED
        if (s != PROBE or due(cfg.probe.every, iteration)) and (s != EVAL or due(cfg.eval.every, iteration))
    )
