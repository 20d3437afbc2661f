"""The train job: the one training loop. The CLI's Prefect flow, the deployments, the tests and the
benchmarks all train through `train`.

    train(cfg, run)                       a plain process (tests, benchmarks)
    train(cfg, run, wrap=as_tasks(...))   flows/train.py: each step becomes a Prefect task (tasks/steps.py)

For each iteration not yet committed, for each of its steps (steps.py: generate, score, probe where due,
aggregate, update, eval where due): check the lease, read the step's inputs from the run, call the pure
stage (stages/), write its outputs under attempt-unique names, then its stage record; then commit the
iteration (MANIFEST.json, created exclusively; storage/run.py) and, where the config says so, evolve the
questions. A step whose record and files check out is not run again, so a killed process resumes at the
first unfinished step. The stages never touch storage: this module owns it, the lease, the backends
(models, servers: their settings and lifetimes), the timings and the experiment trackers (tracking.py),
which get each manifest as it is committed.

Reading order for one RL step: `train` below, then `Runner.generate` -> stages/generate.py, `Runner.score`
-> stages/score.py -> judging/judges.py, `Runner.aggregate` -> stages/aggregate.py -> algorithm/rewards.py,
`Runner.update` -> jobs/policy_update.py -> stages/update.py -> algorithm/losses.py, `Runner.commit` ->
storage/run.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import polars as pl
import torch
from pydantic import BaseModel

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config
from rlme_pipeline.data import Prompts, prompts_for_iteration
from rlme_pipeline.jobs import evolve as evolving
from rlme_pipeline.jobs import memory, oom, replay, update_fsdp
from rlme_pipeline.jobs.background import CheckpointWriter, Deferred
from rlme_pipeline.jobs.policy_update import Updated, update_policy
from rlme_pipeline.jobs.sigterm import Sigterm, Stopped
from rlme_pipeline.jobs.tracking import Trackers
from rlme_pipeline.judging.judges import evaluators_at
from rlme_pipeline.judging.probe import probe_metrics, run_probe, sample_prompts
from rlme_pipeline.models import adapters, checkpoint, weights_at
from rlme_pipeline.models.loading import Loaded, inference_copy, master_dtype
from rlme_pipeline.models.weights_at import ModelRef, frozen_keys, initial_policy, policy_at, pool_capacity
from rlme_pipeline.progress import Clock
from rlme_pipeline.stages import eval as heldout
from rlme_pipeline.stages.aggregate import aggregate
from rlme_pipeline.stages.generate import generate
from rlme_pipeline.stages.score import score
from rlme_pipeline.steps import (
    AGGREGATE,
    COMMIT,
    EVAL,
    EVOLVE,
    GENERATE,
    PROBE,
    SAMPLE,
    SCORE,
    STEPS,
    UPDATE,
    steps_of,
)
from rlme_pipeline.storage import phases, retention
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.lease import Lease
from rlme_pipeline.storage.run import (
    EVAL_FILE,
    REWARDS_FILE,
    ROLLOUTS_FILE,
    SCORES_FILE,
    CorruptRun,
    Manifest,
    Run,
    StageRecord,
    iter_dir,
)
from rlme_pipeline.storage.store import FileEntry

# A step takes the iteration and returns its small, JSON-able record (StageRecord, or Manifest for commit).
Step = Callable[[int], BaseModel]
# The orchestration hook: wrap(name, step) -> the step as it should run (the identity, or a Prefect task).
Wrap = Callable[[str, Step], Step]
# What a recorded step does: its reads, its stage and its writes -> (files, metrics, info) for its record;
# an update whose checkpoint is written in the background gives its `Deferred` in place of the files.
StageIO = Callable[[int], tuple[list[FileEntry] | Deferred, dict, dict]]

log = logging.getLogger(__name__)


def no_wrap(name: str, step: Step) -> Step:
    return step


def check_resume_point(run: Run) -> list[int]:
    """Committed iterations, after proving that what training continues from is intact: every manifest
    parses, and the newest one's files (the checkpoint the next iteration loads) match their hashes.
    Older iterations are left to `rlme verify`, which re-hashes everything. On object storage the
    checkpoint's files are only size-checked here: their download into the cache verifies each sha256,
    and hashing them here too would fetch a multi-GB checkpoint twice."""
    committed = run.committed()
    for i in committed:
        run.manifest(i)  # raises CorruptRun with the file named
    hash_if = (lambda f: True) if run.store.local_path() is not None else (lambda f: "/checkpoint/" not in f.logical)
    if committed and (problems := run.check_files(run.manifest(committed[-1]).files, hash_if)):
        raise CorruptRun(
            f"run {run.url}: committed iteration {committed[-1]} is damaged, refusing to continue on top of it: "
            f"{'; '.join(problems)}. See `rlme verify {run.url}`."
        )
    return committed


def train(
    cfg: Config,
    run: Run,
    *,
    wrap: Wrap = no_wrap,
    advance: int | None = None,
    on_commit: Callable[[Manifest], None] | None = None,
    holder: dict | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
    adopt: phases.Adoption | None = None,
) -> list[Manifest]:
    """Advance the run to cfg.run.iterations committed iterations (or `advance` past the last committed
    one); returns the manifests made now. Raises LeaseHeld, touching nothing, while another process
    trains the run; `holder` adds to what the lease says about this one (e.g. the Prefect flow run).
    `adopt`: a question set to train with from the next iteration on, recorded as a phase (phases.py)."""
    made: list[Manifest] = []
    with (
        Sigterm(logger) as sigterm,  # outermost: the lease and backends are closed before the signal goes on
        Lease(run.store, purpose="train", **(holder or {})) as lease,
        Backends(cfg.vllm_settings(), pool_capacity(cfg)) as backends,
    ):
        cfg = phases.resume_config(run, cfg)
        run.open(cfg)
        committed = set(check_resume_point(run))
        if adopt is not None and (p := phases.adopt(run, adopt, sorted(committed))):
            logger.info("run %s: phase %d (questions %s) from iteration %d", run.url, p.phase, p.questions_sha[:12], p.from_iteration)  # fmt: skip
        if advance is not None:
            cfg = cfg.with_overrides(iterations=(max(committed) + 1 if committed else 0) + advance)
        logger.info("run %s: %d committed iterations, target %d", run.url, len(committed), cfg.run.iterations)
        todo = [i for i in range(cfg.run.iterations) if i not in committed]
        clock = Clock(len(todo), cfg.run.iterations)

        def between_steps() -> None:
            lease.check()
            sigterm.check()  # after SIGTERM no step starts (raises Stopped)

        with (
            Runner(cfg, run, backends, stopping=lambda: sigterm.requested) as runner,
            Trackers(cfg, run.url, runner.samples, logger) as trackers,
        ):
            steps = {name: wrap(name, step) for name, step in runner.steps.items()}
            if committed and runner.evolve_due(last := max(committed)):  # a step killed before it finished
                steps[EVOLVE](last)
            for i in todo:
                logger.info(clock.line(i))
                for stage in steps_of(cfg, i):
                    between_steps()
                    steps[stage](i)  # update(i) may return with its checkpoint still being written (background)
                if runner.samples_ahead(i, todo):
                    lease.check()
                    steps[SAMPLE](i + 1)  # meanwhile: iteration i+1's rollouts, from the weights in memory
                lease.check()
                made.append(m := steps[COMMIT](i))  # the write joined, update(i)'s record, then MANIFEST(i)
                trackers.record(m)
                clock.done()
                if on_commit:
                    on_commit(m)
                if runner.evolve_due(i):
                    between_steps()
                    steps[EVOLVE](i)
    return made


class Pending(BaseModel):
    """What the update step returns while its checkpoint is written in the background: the commit step
    joins the write and writes the update's record (checkpoint.background_write)."""

    stage: str
    iteration: int


class Sampled(BaseModel):
    """What the sample step returns: rollouts computed, to be written by generate after the commit."""

    iteration: int
    rollouts: int


@dataclass
class Ahead:
    """generate(i)'s rollouts, sampled before the commit of i-1 from update(i-1)'s weights in memory;
    `version` is those weights' sha256, known once their checkpoint is written."""

    rollouts: pl.DataFrame
    metrics: dict
    seconds: float
    version: str | None = None


def pending_path(i: int) -> str:
    """The pool's name for update i's weights while their checkpoint is being written (no directory yet)."""
    return f"pending:{iter_dir(i)}/checkpoint"


class Runner:
    """The steps of one run: inputs read from the run, outputs written to it, models from `backends`.
    `stopping`: whether SIGTERM asked the run to stop (the update in progress then writes the full state)."""

    def __init__(self, cfg: Config, run: Run, backends: Backends, stopping: Callable[[], bool] = lambda: False):
        self.cfg, self.run, self.backends, self.stopping = cfg, run, backends, stopping
        self.phases = phases.read(run, cfg.questions)  # which questions judge which iteration
        self.prompts = Prompts(cfg)  # loaded once, on first use
        # checkpoint.background_write: update(i)'s checkpoint is written by `writer` while sample(i+1) runs
        # from the weights in memory (hf generation, one update process, full fine-tuning); the record of
        # the update waits in `unrecorded` until `settle`, generate(i+1)'s rollouts in `ahead`.
        self.defers = (
            cfg.checkpoint.background_write
            and cfg.generation.backend == "hf"
            and cfg.distributed.processes == 1
            and cfg.policy.lora is None
        )
        if cfg.checkpoint.background_write and not self.defers:
            log.info(
                "checkpoint.background_write applies with generation.backend hf, distributed.processes 1 and no "
                "policy.lora; this run writes each checkpoint before the next iteration starts"
            )
        self.writer = CheckpointWriter()
        self.unrecorded: Callable[..., StageRecord] | None = None
        self.ahead: dict[int, Ahead] = {}
        # The step table. A recorded step is its StageIO run through `run_stage` (skipped when its record
        # and files check out; its record written after its data files); sample, commit and evolve are steps too.
        self.stages: dict[str, StageIO] = {
            GENERATE: self.generate,
            SCORE: self.score,
            PROBE: self.probe,
            AGGREGATE: self.aggregate,
            UPDATE: self.update,
            EVAL: self.eval,
        }
        self.steps: dict[str, Step] = {name: self._recorded(name) for name in self.stages}
        self.steps |= {SAMPLE: self.sample, COMMIT: self.commit, EVOLVE: self.evolve}
        assert tuple(self.steps) == STEPS, "the step table must hold every step of steps.py, in order"

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Stopped on SIGTERM, the update that finished is recorded (its checkpoint complete, and full);
        on any other error a background write is let finish, unrecorded (resume re-runs that update)."""
        try:
            if exc_type is Stopped:
                self.settle()
        finally:
            self.writer.close()

    def _recorded(self, stage: str) -> Step:
        return lambda iteration: self.run_stage(iteration, stage, settle=False)[0]

    def run_stage(self, iteration: int, stage: str, *, settle: bool = True) -> tuple[StageRecord | Pending, bool]:
        """(record, ran): a stage whose record and files check out is not run again. An update whose
        checkpoint goes to the background writer is recorded by `settle`: here (settle True, one step run
        alone), or by the commit step (the train loop's update step gives `Pending`)."""
        rec = self.run.stage_record(iteration, stage)
        if rec is not None:
            return rec, False
        t0 = time.perf_counter()
        with self.backends.starts() as started:
            files, metrics, info = self._io(iteration, stage)
        # loading this iteration's weights into vLLM: a server start, or a sync into a running one
        for kind, name in (("start", "backend_start_seconds"), ("sync", "weight_sync_seconds")):
            if seconds := [s for k, s in started if k == kind]:
                metrics[name] = float(sum(seconds))
        record = partial(StageRecord, stage=stage, iteration=iteration, seconds=time.perf_counter() - t0)
        if isinstance(files, Deferred):
            self.unrecorded = partial(record, metrics=metrics, info=info)
            return (self.settle() if settle else Pending(stage=stage, iteration=iteration)), True
        return self._record(record(files=files, metrics=metrics, info=info)), True

    def _record(self, rec: StageRecord) -> StageRecord:
        crash_point(f"{rec.stage}:written", rec.iteration)
        self.run.write_stage_record(rec)  # written after its data files: the record is the stage's commit
        return rec

    def settle(self) -> StageRecord | None:
        """Join the background checkpoint write, then write its update's record. Whatever reads that
        checkpoint through the run (eval, the commit) or changes the weights the write reads (the next
        update) settles first; None when nothing was pending."""
        joined = self.writer.join()
        if joined is None:
            return None
        files, metrics, info = joined
        rec = self.unrecorded(files=files)
        self.unrecorded = None
        return self._record(rec.model_copy(update={"metrics": rec.metrics | metrics, "info": rec.info | info}))

    def _io(self, iteration: int, stage: str) -> tuple[list[FileEntry] | Deferred, dict, dict]:
        """The stage's reads, call and writes. Out of GPU memory it raises one StageOutOfMemory naming the
        knobs, raised outside the except block: the failed attempt's frames (and their tensors) are let go."""
        try:
            return self.stages[stage](iteration)
        except torch.OutOfMemoryError as e:
            error = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        oom.free()
        raise oom.StageOutOfMemory(oom.message(self.cfg, stage, iteration, error))

    def samples_ahead(self, i: int, todo: list[int]) -> bool:
        """Whether iteration i+1's rollouts are sampled before the commit of i: while update(i)'s checkpoint
        is being written, unless the run is stopping."""
        p = self.writer.pending
        return p is not None and p.iteration == i and i + 1 in todo and not self.stopping()

    def sample(self, iteration: int) -> Sampled:
        """generate(i)'s rollouts, sampled while update(i-1)'s checkpoint is being written, from its weights in
        memory. Nothing is written: generate(i) writes them after the commit of i-1 (no record of an iteration
        before its predecessor's MANIFEST.json), with their policy_version, the sha256 the writer computes."""
        t0 = time.perf_counter()
        cfg = self.cfg
        ref = ModelRef(pending_path(iteration - 1), "", cfg.policy.dtype, cfg.policy.device)
        rollouts, metrics = self._sample(iteration, ref)
        self.ahead[iteration] = Ahead(rollouts, metrics, time.perf_counter() - t0)
        return Sampled(iteration=iteration, rollouts=rollouts.height)

    def commit(self, iteration: int) -> Manifest:
        self.settle()
        if iteration in self.run.committed():
            m = self.run.manifest(iteration)
        else:
            records = [self.run.read_record(iteration, s) for s in steps_of(self.cfg, iteration)]
            m = self.run.commit(iteration, self.cfg, records)
        retention.prune(self.run, self.cfg.checkpoint)  # after the commit: the new checkpoint is the resume point
        return m

    def evolve_due(self, iteration: int) -> bool:
        return self.cfg.evolve is not None and evolving.due(self.cfg, self.run.manifest(iteration)) is not None

    def evolve(self, iteration: int) -> StageRecord:
        """Propose, rank and maybe adopt a question set as the phase from the next iteration (jobs/evolve.py)."""
        why = evolving.due(self.cfg, self.run.manifest(iteration))
        rec = evolving.online_step(self.run, self.cfg, iteration, why, self.backends)
        self.phases = phases.read(self.run, self.cfg.questions)
        return rec

    def samples(self, iteration: int, n: int) -> list[dict]:
        """A few committed completions for the trackers: n rollouts, different prompts first, chosen by
        rollout id (a hash), so the same rows whoever asks."""
        columns = ("rollout_id", "prompt_id", "iteration", "prompt", "completion")
        rollouts = self.run.read_table(iteration, ROLLOUTS_FILE).select(columns)
        rewards = self.run.read_table(iteration, REWARDS_FILE).select("rollout_id", "reward")
        picked = (
            rollouts.join(rewards, on="rollout_id", how="left")
            .with_columns(nth=pl.col("rollout_id").rank("ordinal").over("prompt_id"))
            .sort("nth", "rollout_id")
            .head(n)
        )
        return picked.select("iteration", "prompt", "completion", "reward").to_dicts()

    # --- the recorded steps: each returns (files, metrics, info) ----------------------------------------
    def generate(self, i: int) -> tuple[list[FileEntry], dict, dict]:
        """G completions per prompt of this iteration's slice, from the policy iteration i starts from; taken
        from `sample` where it ran, if the committed checkpoint is the one it sampled from."""
        cfg, backend = self.cfg, self.cfg.generation.backend
        ref = policy_at(self.run, cfg, i)
        ahead = self.ahead.pop(i, None)
        if ahead is not None and ahead.version == ref.version:
            rollouts = ahead.rollouts.with_columns(policy_version=pl.lit(ref.version))
            metrics = {**ahead.metrics, "sampled_ahead_seconds": ahead.seconds}
        else:  # nothing sampled ahead, or another writer's commit of i-1 stands (its weights differ)
            rollouts, metrics = self._sample(i, ref)
        info = {
            "policy": {"ref": cfg.policy.model, "version": ref.version},
            "prompt_ids": prompts_for_iteration(self.prompts.train(), cfg, i)["prompt_id"].to_list(),
            "backend": backend,
        }
        return [self.run.write_table(i, ROLLOUTS_FILE, rollouts, "rollouts")], metrics, info

    def _sample(self, i: int, ref: ModelRef) -> tuple[pl.DataFrame, dict]:
        prompts = prompts_for_iteration(self.prompts.train(), self.cfg, i)
        with self.backends.generator(ref, self.cfg.generation.backend, colocated=self._engine_memory) as (gen, tok):
            return generate(self.cfg, self.run.id, i, prompts, ref.version, gen, tok)

    def _engine_memory(self) -> float:
        """The share of the policy's GPU a vLLM engine built now may take: the device less what this trainer
        holds (jobs/memory.py), not vLLM's 0.9 of the device, which fails beside a trainer."""
        return memory.colocated_share(self.cfg, self.prompts.train())

    def score(self, i: int) -> tuple[list[FileEntry], dict, dict]:
        """Every rollout x evaluator x question of this iteration's phase."""
        cfg = self.phases.config_at(self.cfg, i)
        evaluators = evaluators_at(self.run, cfg, i)
        scores, metrics = score(cfg, self.run.read_table(i, ROLLOUTS_FILE), evaluators, self.backends)
        info = {
            "evaluators": [
                {"name": e.name, "ref": ev.model, "weight": ev.weight, "version": e.ref.version}
                for e, ev in zip(evaluators, cfg.evaluators)
            ],
            "questions": [{"id": q.id, "text": q.text, "weight": q.weight, "sha": q.sha()} for q in cfg.questions],
            "template_sha": cfg.scoring.template_sha(),
            **self.phases.lineage(i),
        }
        return [self.run.write_table(i, SCORES_FILE, scores, "scores")], metrics, info

    def probe(self, i: int) -> tuple[list[FileEntry], dict, dict]:
        """Would this iteration's judges say yes to answers that say nothing? Metrics only; the flow turns
        an alarm into a Prefect event (judging/probe.py)."""
        cfg = self.phases.config_at(self.cfg, i)
        prompts = sample_prompts(self.run.read_table(i, ROLLOUTS_FILE), cfg.probe.prompts, cfg.run.seed)
        table = run_probe(evaluators_at(self.run, cfg, i), cfg.questions, cfg.scoring, prompts, i, self.backends)
        return [], probe_metrics(table, cfg.probe.alarm_share), {}

    def aggregate(self, i: int) -> tuple[list[FileEntry], dict, dict]:
        """Rewards and group-centred advantages from the scores (and labels, with label_reward)."""
        rewards, metrics = aggregate(
            self.phases.config_at(self.cfg, i),
            self.run.read_table(i, SCORES_FILE),
            self.run.read_table(i, ROLLOUTS_FILE),
        )
        return [self.run.write_table(i, REWARDS_FILE, rewards, "rewards")], metrics, {}

    def update(self, i: int) -> tuple[list[FileEntry] | Deferred, dict, dict]:
        """One policy update on this iteration's rollouts and advantages; its checkpoint is iteration i's:
        the full training state or the weights alone (`full_state_due`), written now or handed to the
        background writer (checkpoint.background_write: the step then returns, the commit records it)."""
        cfg, pool = self.cfg, self.backends.pool
        self.settle()  # a write still reading the weights is joined before they change (the commit did it)
        ref = policy_at(self.run, cfg, i)
        if cfg.distributed.processes > 1:
            return self._distributed_update(ref, i)
        lora = cfg.policy.lora is not None
        lm, reference, replayed = self._adapted_trainee(ref, i) if lora else self._trainee(ref, i)
        done = update_policy(
            cfg, self.run, i, ref.path, lm, reference, full=partial(self.full_state_due, i), defer=self.defers
        )
        metrics = {**done.metrics, **replayed}
        if done.taken is not None:
            then = partial(self._written, ref, i, {"policy_before": ref.version})
            deferred = self.writer.submit(i, done.taken, then)
            self._keep_trained(ref, lm, done, "", pending_path(i))  # what sample(i+1) generates with meanwhile
            return deferred, metrics, {}
        version = checkpoint.weights_entry(done.files).sha256
        if lora:
            adapters.trained(pool, cfg, lm, done.optimizer, version)
        else:
            self._keep_trained(ref, lm, done, version, checkpoint.local_dir(self.run, i, done.files))
        return done.files, metrics, {"policy_before": ref.version, "policy_after": version, "update_processes": 1}

    def _written(self, ref: ModelRef, i: int, info: dict, files: list[FileEntry]) -> tuple[list[FileEntry], dict, dict]:
        """Update i's background write is done: its weights move to their checkpoint's name in the pool, and
        the rollouts sampled from them ahead learn their version."""
        version = checkpoint.weights_entry(files).sha256
        path, pool = checkpoint.local_dir(self.run, i, files), self.backends.pool
        for dtype in {master_dtype(ref.dtype), ref.dtype}:
            if (lm := pool.peek(pending_path(i), dtype, ref.device)) is not None:
                pool.discard(pending_path(i), dtype, ref.device)
                pool.put((path, dtype, ref.device), replace(lm, version=version, path=path))
        if (ahead := self.ahead.get(i + 1)) is not None:
            ahead.version = version
        return files, {}, {**info, "policy_after": version, "update_processes": 1}

    def full_state_due(self, i: int) -> bool:
        """Whether update i's checkpoint holds the whole training state: every checkpoint.full_every-th, the
        last of this call's target (the next call, a scheduled run, resumes without a replay), and on SIGTERM."""
        every = self.cfg.checkpoint.full_every
        return (i + 1) % every == 0 or i == self.cfg.run.iterations - 1 or self.stopping()

    def eval(self, i: int) -> tuple[list[FileEntry], dict, dict]:
        """The policy this iteration's update made, on the held-out prompts (stages/eval.py); judged by
        the evaluators as they judge the next iteration, with this iteration's questions (its phase)."""
        self.settle()  # it reads update i's checkpoint through the run (and its live-self judges do)
        cfg, backend = self.phases.config_at(self.cfg, i), self.cfg.generation.backend
        prompts = self.prompts.heldout()
        ref = policy_at(self.run, cfg, i + 1)
        with self.backends.generator(ref, backend, colocated=self._engine_memory) as (gen, tok):
            rollouts = heldout.completions(cfg, self.run.id, i, prompts, ref.version, gen, tok)
        evaluators = evaluators_at(self.run, cfg, i + 1) if cfg.eval.judges else []
        table, metrics = heldout.evaluate(cfg, rollouts, evaluators, self.backends)
        info = {
            "eval": {
                "policy_version": ref.version,
                "prompt_ids": prompts["prompt_id"].to_list(),
                "evaluators": {e.name: e.ref.version for e in evaluators},
            }
        }
        return [self.run.write_table(i, EVAL_FILE, table, "eval")], metrics, info

    # --- the trainee: which model the update trains, and what stays in the pool after it ----------------
    def _distributed_update(self, ref: ModelRef, i: int) -> tuple[list[FileEntry], dict, dict]:
        """The update in cfg.distributed.processes ranks (FSDP2, update_fsdp.py). The ranks get every GPU
        whole: this process lets go of its models first, and the next iteration loads the checkpoint."""
        self.backends.pool.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        files, metrics = update_fsdp.launch(self.cfg, self.run, i, ref.path)
        version = checkpoint.weights_entry(files).sha256
        info = {"policy_before": ref.version, "policy_after": version}
        return files, metrics, {**info, "update_processes": self.cfg.distributed.processes}

    def _trainee(self, ref: ModelRef, i: int) -> tuple[Loaded, object, dict]:
        """(the policy to train, the KL reference or None, the replay's metrics). Training changes the
        weights, so the model leaves the pool (a copy of it does where the same weights are also a frozen
        model: iteration 0's policy as the frozen self or the KL reference). A half-precision policy trains
        fp32 master weights (models.master_dtype); its half copy that generated this iteration is done with,
        unless frozen. Not kept from the previous update (a resume), the trainee is loaded from the checkpoint
        when it holds the full state, else replayed from the last full state (jobs/replay.py)."""
        pool, master, frozen = self.backends.pool, master_dtype(ref.dtype), frozen_keys(self.cfg)
        reference = None
        if self.cfg.algorithm.beta > 0:  # the KL anchor is the initial policy; loaded only when it is used
            init = initial_policy(self.cfg)
            reference = pool.get(init.path, init.dtype, init.device, init.version).model

        def take(path: str, version: str | None = None) -> Loaded:
            return pool.take(path, master, ref.device, version, keep=(path, master, ref.device) in frozen)

        kept = pool.peek(ref.path, master, ref.device)
        if (kept is None or kept.optimizer is None) and replay.needed(self.run, i):
            pool.discard(ref.path, master, ref.device)  # loaded from the light checkpoint to generate: not it
            lm, replayed = replay.replay(self.cfg, self.run, i, reference, take)
        else:
            lm, replayed = take(ref.path, ref.version), {}
        if master != ref.dtype and (ref.path, ref.dtype, ref.device) not in frozen:
            pool.discard(ref.path, ref.dtype, ref.device)
        return lm, reference, replayed

    def _adapted_trainee(self, ref: ModelRef, i: int) -> tuple[Loaded, object, dict]:
        """A LoRA policy trains its adapter in the pool's one copy of the base; the KL anchor is that same
        model with the adapters off."""
        lm = adapters.trainable(self.backends.pool, self.cfg, ref, i)
        return lm, adapters.AdaptersOff(lm.model) if self.cfg.algorithm.beta > 0 else None, {}

    def _keep_trained(self, ref: ModelRef, lm: Loaded, done: Updated, version: str, path: str) -> None:
        """The trained model (its optimizer and RNG with it) serves the next iteration without a reload."""
        pool, master = self.backends.pool, master_dtype(ref.dtype)
        pool.put((path, master, ref.device), Loaded(lm.model, lm.tokenizer, version, path, done.optimizer, done.rng))
        # what hf generates (and a live-self evaluator judges) with; a vLLM engine takes the master's tensors
        if master != ref.dtype and weights_at.hf_reads_policy(self.cfg):
            pool.put(
                (path, ref.dtype, ref.device), Loaded(inference_copy(lm.model, ref.dtype), lm.tokenizer, version, path)
            )
