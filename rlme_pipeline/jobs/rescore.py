"""The re-score job: a run's stored rollouts judged again, into a new score set beside the old ones.

    plan      DEFINITION.json: the questions, evaluators, iterations and shards (scoreset.plan)
    shards    each shard scored, aggregated as training does and committed on its own, fanned out
    finalize  the shards merged, the score set's MANIFEST.json committed (scoreset.finalize)

`rlme rescore` (flows/rescore.py, shards as Prefect tasks, optionally on Ray), `rlme evolve` (each
candidate question set) and the tests all re-score through `rescore`. A shard that is committed is not
scored again, so a re-run with resume=True continues where an interrupted one stopped.
"""

from __future__ import annotations

from functools import partial

from rlme_pipeline import scoreset
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import EvaluatorConfig, QuestionConfig
from rlme_pipeline.jobs.hooks import FanOut, Wrap, in_order, no_wrap
from rlme_pipeline.storage.run import Run


def rescore(
    run: Run,
    name: str,
    *,
    questions: list[QuestionConfig] | None = None,
    evaluators: list[EvaluatorConfig] | None = None,
    iterations: str | None = None,
    shard_rows: int = 256,
    resume: bool = False,
    backends: Backends | None = None,
    shards_per_task: int | None = None,
    wrap: Wrap = no_wrap,
    fan_out: FanOut = in_order,
) -> dict:
    """The committed score set's manifest (as JSON), with `shards`: one small record per shard.

    backends: this process's models, shared by every shard (in-process fan-outs only); None: each task
    of the fan-out opens its own. shards_per_task: shards per fanned-out item (default: all in one)."""

    def plan() -> list[tuple[int, int]]:
        defn = scoreset.plan(
            run,
            name,
            questions=questions,
            evaluators=evaluators,
            iterations=iterations,
            shard_rows=shard_rows,
            resume=resume,
        )
        return scoreset.shards(defn)

    todo = wrap("rescore-plan", plan)()
    per = shards_per_task or max(1, len(todo))
    work = scoreset.score_shards if backends is None else partial(scoreset.score_shards, backends=backends)
    items = [(run.url, name, todo[k : k + per], run.store.options) for k in range(0, len(todo), per)]
    done = [d for batch in fan_out(work, items) for d in batch]
    manifest = wrap("rescore-finalize", lambda: scoreset.finalize(run, name))()
    return {**manifest, "shards": done}
