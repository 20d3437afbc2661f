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

import polars as pl
import torch
from pydantic import BaseModel

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config
from rlme_pipeline.data import Prompts, prompts_for_iteration
from rlme_pipeline.jobs import evolve as evolving
from rlme_pipeline.jobs import memory, oom, update_fsdp
from rlme_pipeline.jobs.policy_update import update_policy
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
from rlme_pipeline.steps import AGGREGATE, COMMIT, EVAL, EVOLVE, GENERATE, PROBE, SCORE, STEPS, UPDATE, steps_of
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
)
from rlme_pipeline.storage.store import FileEntry

# A step takes the iteration and returns its small, JSON-able record (StageRecord, or Manifest for commit).
Step = Callable[[int], BaseModel]
# The orchestration hook: wrap(name, step) -> the step as it should run (the identity, or a Prefect task).
Wrap = Callable[[str, Step], Step]
# What a recorded step does: its reads, its stage and its writes -> (files, metrics, info) for its record.
StageIO = Callable[[int], tuple[list[FileEntry], dict, dict]]

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
    with (
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
        runner = Runner(cfg, run, backends)
        steps = {name: wrap(name, step) for name, step in runner.steps.items()}
        made = []
        todo = [i for i in range(cfg.run.iterations) if i not in committed]
        clock = Clock(len(todo), cfg.run.iterations)
        with Trackers(cfg, run.url, runner.samples, logger) as trackers:
            if committed and runner.evolve_due(last := max(committed)):  # a step killed before it finished
                steps[EVOLVE](last)
            for i in todo:
                logger.info(clock.line(i))
                for stage in steps_of(cfg, i):
                    lease.check()
                    steps[stage](i)
                lease.check()
                made.append(m := steps[COMMIT](i))
                trackers.record(m)
                clock.done()
                if on_commit:
                    on_commit(m)
                if runner.evolve_due(i):
                    lease.check()
                    steps[EVOLVE](i)
        return made


class Runner:
    """The steps of one run: inputs read from the run, outputs written to it, models from `backends`."""

    def __init__(self, cfg: Config, run: Run, backends: Backends):
        self.cfg, self.run, self.backends = cfg, run, backends
        self.phases = phases.read(run, cfg.questions)  # which questions judge which iteration
        self.prompts = Prompts(cfg)  # loaded once, on first use
        # The step table. A recorded step is its StageIO run through `run_stage` (skipped when its record
        # and files check out; its record written after its data files); commit and evolve are steps too.
        self.stages: dict[str, StageIO] = {
            GENERATE: self.generate,
            SCORE: self.score,
            PROBE: self.probe,
            AGGREGATE: self.aggregate,
            UPDATE: self.update,
            EVAL: self.eval,
        }
        self.steps: dict[str, Step] = {name: self._recorded(name) for name in self.stages}
        self.steps |= {COMMIT: self.commit, EVOLVE: self.evolve}
        assert tuple(self.steps) == STEPS, "the step table must hold every step of steps.py, in order"

    def _recorded(self, stage: str) -> Step:
        return lambda iteration: self.run_stage(iteration, stage)[0]

    def run_stage(self, iteration: int, stage: str) -> tuple[StageRecord, bool]:
        """(record, ran): a stage whose record and files check out is not run again."""
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
        rec = StageRecord(
            stage=stage, iteration=iteration, files=files, seconds=time.perf_counter() - t0, metrics=metrics, info=info
        )
        crash_point(f"{stage}:written", iteration)
        self.run.write_stage_record(rec)  # written after its data files: the record is the stage's commit
        return rec, True

    def _io(self, iteration: int, stage: str) -> tuple[list[FileEntry], dict, dict]:
        """The stage's reads, call and writes. Out of GPU memory it raises one StageOutOfMemory naming the
        knobs, raised outside the except block: the failed attempt's frames (and their tensors) are let go."""
        try:
            return self.stages[stage](iteration)
        except torch.OutOfMemoryError as e:
            error = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        oom.free()
        raise oom.StageOutOfMemory(oom.message(self.cfg, stage, iteration, error))

    def commit(self, iteration: int) -> Manifest:
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
        """G completions per prompt of this iteration's slice, from the policy iteration i starts from."""
        cfg, backend = self.cfg, self.cfg.generation.backend
        prompts = prompts_for_iteration(self.prompts.train(), cfg, i)
        ref = policy_at(self.run, cfg, i)
        with self.backends.generator(ref, backend, colocated=self._engine_memory) as (gen, tok):
            rollouts, metrics = generate(cfg, self.run.id, i, prompts, ref.version, gen, tok)
        info = {
            "policy": {"ref": cfg.policy.model, "version": ref.version},
            "prompt_ids": prompts["prompt_id"].to_list(),
            "backend": backend,
        }
        return [self.run.write_table(i, ROLLOUTS_FILE, rollouts, "rollouts")], metrics, info

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

    def update(self, i: int) -> tuple[list[FileEntry], dict, dict]:
        """One policy update on this iteration's rollouts and advantages; its checkpoint is iteration i's."""
        cfg, pool = self.cfg, self.backends.pool
        ref = policy_at(self.run, cfg, i)
        if cfg.distributed.processes > 1:
            return self._distributed_update(ref, i)
        lora = cfg.policy.lora is not None
        lm, reference = self._adapted_trainee(ref, i) if lora else self._trainee(ref)
        opt, files, metrics = update_policy(cfg, self.run, i, ref.path, lm, reference)
        version = checkpoint.weights_entry(files).sha256
        if lora:
            adapters.trained(pool, cfg, lm, opt, version)
        else:
            self._keep_trained(ref, lm, opt, version, checkpoint.local_dir(self.run, i, files))
        return files, metrics, {"policy_before": ref.version, "policy_after": version, "update_processes": 1}

    def eval(self, i: int) -> tuple[list[FileEntry], dict, dict]:
        """The policy this iteration's update made, on the held-out prompts (stages/eval.py); judged by
        the evaluators as they judge the next iteration, with this iteration's questions (its phase)."""
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

    def _trainee(self, ref: ModelRef) -> tuple[Loaded, object]:
        """(the policy to train, the KL reference or None). Training changes the weights, so the model
        leaves the pool (a copy of it does where the same weights are also a frozen model: iteration 0's
        policy as the frozen self or the KL reference). A half-precision policy trains fp32 master weights
        (models.master_dtype); its half copy that generated this iteration is done with, unless frozen."""
        pool, master, frozen = self.backends.pool, master_dtype(ref.dtype), frozen_keys(self.cfg)
        lm = pool.take(ref.path, master, ref.device, ref.version, keep=(ref.path, master, ref.device) in frozen)
        if master != ref.dtype and (ref.path, ref.dtype, ref.device) not in frozen:
            pool.discard(ref.path, ref.dtype, ref.device)
        reference = None
        if self.cfg.algorithm.beta > 0:  # the KL anchor is the initial policy; loaded only when it is used
            init = initial_policy(self.cfg)
            reference = pool.get(init.path, init.dtype, init.device, init.version).model
        return lm, reference

    def _adapted_trainee(self, ref: ModelRef, i: int) -> tuple[Loaded, object]:
        """A LoRA policy trains its adapter in the pool's one copy of the base; the KL anchor is that same
        model with the adapters off."""
        lm = adapters.trainable(self.backends.pool, self.cfg, ref, i)
        return lm, adapters.AdaptersOff(lm.model) if self.cfg.algorithm.beta > 0 else None

    def _keep_trained(self, ref: ModelRef, lm: Loaded, opt, version: str, path: str) -> None:
        """The trained model (and its optimizer) serves the next iteration without a reload."""
        pool, master = self.backends.pool, master_dtype(ref.dtype)
        pool.put((path, master, ref.device), Loaded(lm.model, lm.tokenizer, version, path, opt))
        # what hf generates (and a live-self evaluator judges) with; a vLLM engine takes the master's tensors
        if master != ref.dtype and weights_at.hf_reads_policy(self.cfg):
            pool.put(
                (path, ref.dtype, ref.device), Loaded(inference_copy(lm.model, ref.dtype), lm.tokenizer, version, path)
            )
