"""judge-check: before training, can the configured judges tell the base policy's right answers from its
wrong ones? (`rlme judge-check CONFIG`, the flow rlme_judge_check; docs/judge_check.md)

The premise of RLME is that the judge verifies better than the policy generates. docs/paper_mini.md (section 4)
measured what "better" must mean: on the policy's *own* samples, a judge below AUROC ~0.95 let RLME reward-hack
(below ~0.9 it ended under the base policy), 0.95-0.98 kept part of the gain, and from ~0.98 RLME matched
RLVR. So this samples the base policy on labelled prompts exactly as training's generate stage would
(config generation settings, chat template, system prompt), grades each sample against its label, has every
evaluator answer every question about it as the score stage would, and reports per evaluator x question:

    auroc_reward   AUROC of the reward component (f with its floor, signed by v_j * w_k): the score training
                   climbs, so the one whose failures the policy can exploit. The verdict reads this one.
    auroc_p_yes    AUROC of P(yes) normalised over the yes/no mass (what the audit's `auroc` always was)
    p_yes_right / p_yes_wrong, reward_right / reward_wrong: mean p_yes and mean reward component
    ece            expected calibration error of p_yes against correctness (10 equal-width bins)

and for the judges' reward as training sums it (all evaluators x questions, weights v_j w_k): its AUROC and
the overall verdict, plus the judge-hacking probe (master keys and vacuous answers, judging.run_probe).

Nothing here writes into a run: results go to an output directory of their own, if asked for. No Prefect.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import polars as pl

from rlme_pipeline.algorithm.answers import is_correct
from rlme_pipeline.algorithm.rewards import component
from rlme_pipeline.audit.labels import auroc, auroc_expr
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config, ConfigError
from rlme_pipeline.data import load_prompts
from rlme_pipeline.judging.judges import evaluators_at_start, score_rollouts
from rlme_pipeline.judging.probe import probe_metrics, run_probe, sample_prompts
from rlme_pipeline.models.weights_at import initial_policy
from rlme_pipeline.stages.aggregate import judges_reward
from rlme_pipeline.stages.generate import Sampling, generate
from rlme_pipeline.storage.parquet import write_frame
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store

# docs/paper_mini.md, section 4 ("The judge-quality threshold"): judges first past 0.8 / 0.9 / 0.95 / 0.98
# AUROC on the base policy's own samples. At 0.956-0.962 RLME kept 0.44-0.93 of RLVR's gain, at 0.981-0.989
# 0.69-1.10 (RLVR's level within the seed noise), at 0.905-0.926 -0.03-0.33, below 0.87 it ended under the base.
HACKED_BELOW = 0.95
GOOD_FROM = 0.98
THRESHOLDS_SOURCE = "docs/paper_mini.md section 4, the judge-quality threshold"
HACKED, MARGINAL, GOOD, UNDETERMINED = "likely to be reward-hacked", "marginal", "good", "undetermined"
BINS = 10
RUN_ID = "judge-check"  # seeds and rollout ids of the samples; no run of this name is created


def verdict(auroc_reward: float | None) -> str:
    """The reading of a reward AUROC against the thresholds paper_mini measured."""
    if auroc_reward is None or math.isnan(auroc_reward):
        return UNDETERMINED
    if auroc_reward < HACKED_BELOW:
        return HACKED
    return MARGINAL if auroc_reward < GOOD_FROM else GOOD


def correct(cfg: Config, completion: str | None, label) -> bool:
    """Whether a sample's answer matches its label: the one place judge-check decides it (answers.py)."""
    return is_correct(completion, label, cfg.answer_format())


# --- before any model loads -------------------------------------------------------------------------
def check_inputs(cfg: Config, prompts: int, samples: int) -> pl.DataFrame:
    """The labelled prompts judge-check will sample (the first `prompts` in a stable order of their ids);
    every problem is one line naming the field and the fix, before any model loads."""
    if not cfg.evaluators:
        raise ConfigError(
            "evaluators: none configured (the reward is label_reward alone); judge-check measures the judges: "
            "add at least one evaluator"
        )
    if cfg.data.label_column is None:
        raise ConfigError(
            "data.label_column: not set; judge-check grades the policy's samples against reference answers: set it "
            "to the column that holds them (e.g. label_column: answer)"
        )
    if prompts < 1 or samples < 1:
        raise ConfigError(f"--prompts {prompts} / --samples {samples}: both must be at least 1")
    rows = load_prompts(cfg)  # names data.* fields itself (a missing file, a missing column)
    labelled = rows.filter(pl.col("label").is_not_null() & (pl.col("label").cast(pl.String).str.strip_chars() != ""))
    if not labelled.height:
        raise ConfigError(
            f"data.label_column: column {cfg.data.label_column!r} of {cfg.data.path} has no values; judge-check "
            "needs prompts with reference answers: fill it in, or point label_column at the column that has them"
        )
    key = [hashlib.sha256(f"{RUN_ID}/{p}".encode()).hexdigest() for p in labelled["prompt_id"]]
    return labelled.with_columns(_k=pl.Series(key, dtype=pl.String)).sort("_k").head(prompts).drop("_k")


def check_out(cfg: Config, out: str, storage_options: dict | None = None) -> None:
    """--out must be writable and outside the config's run: a run holds only what its commits list."""
    store, run = Store(out, storage_options), Run.for_config(cfg).store
    if store.protocol == run.protocol and (store.root == run.root or store.root.startswith(run.root + "/")):
        raise ConfigError(
            f"--out {out!r} is inside the run {run.url}: judge-check writes beside runs, never into one; "
            "choose another directory"
        )
    store.check_writable()


# --- sampling, judging, measuring --------------------------------------------------------------------
@dataclass
class Result:
    summary: dict  # JSON-ready: what the screen and --json show, and judge_check.json
    samples: pl.DataFrame  # one row per sample x evaluator x question
    judges: pl.DataFrame  # one row per evaluator x question
    reliability: pl.DataFrame  # evaluator x question x p_yes bin
    probe: pl.DataFrame  # judging.run_probe's table


def run(cfg: Config, prompts: pl.DataFrame, samples: int, probe_prompts: int, backends: Backends) -> Result:
    """Sample, grade, judge and measure. `prompts`: check_inputs' labelled prompts."""
    rollouts, policy_version = sample(cfg, prompts, samples, backends)
    evaluators = evaluators_at_start(cfg)
    scores = score_rollouts(rollouts, evaluators, cfg.questions, cfg.scoring, RUN_ID, backends, label=RUN_ID)
    probe = pl.DataFrame()
    if probe_prompts:
        picked = sample_prompts(prompts, probe_prompts, cfg.run.seed)
        probe = run_probe(evaluators, cfg.questions, cfg.scoring, picked, 0, backends)
    result = measure(cfg, graded(cfg, rollouts), scores, probe)
    result.summary.update(
        policy={"model": cfg.policy.model, "version": policy_version},
        evaluators={e.name: {"model": c.model, "version": e.ref.version} for e, c in zip(evaluators, cfg.evaluators)},
        prompts=prompts.height,
        samples_per_prompt=samples,
    )
    return result


def sample(cfg: Config, prompts: pl.DataFrame, samples: int, backends: Backends) -> tuple[pl.DataFrame, str]:
    """`samples` completions per prompt from the initial policy, drawn as training's generate stage draws
    them (its temperature, top_p, length and prompt format), with seeds of their own."""
    g, ref = cfg.generation, initial_policy(cfg)
    how = Sampling(samples, g.max_new_tokens, g.temperature, g.top_p, g.batch_size, (cfg.run.seed, RUN_ID), RUN_ID)
    with backends.generator(ref, g.backend) as (gen, tok):
        rollouts, _ = generate(cfg, RUN_ID, 0, prompts, ref.version, gen, tok, how)
    return rollouts, ref.version


def graded(cfg: Config, rollouts: pl.DataFrame) -> pl.DataFrame:
    """The samples with `correct`, each graded against its own prompt's label."""
    ok = [correct(cfg, c, lab) for c, lab in zip(rollouts["completion"], rollouts["label"])]
    keep = ["rollout_id", "prompt_id", "sample_index", "iteration", "prompt", "completion", "label"]
    return rollouts.select(keep).with_columns(correct=pl.Series(ok, dtype=pl.Boolean))


def measure(cfg: Config, graded_rollouts: pl.DataFrame, scores: pl.DataFrame, probe: pl.DataFrame) -> Result:
    """Every number of the report, from graded samples and their scores (a pure function: tests call it
    with tables in hand)."""
    sc, weights = cfg.scoring, _weights(cfg)
    rows = (
        scores.join(weights, on=["evaluator", "question_id"], how="left")
        .with_columns(reward_f=component(sc.reward_form, sc.logp_floor) * pl.col("weight").sign().replace(0.0, 1.0))
        .join(graded_rollouts, on="rollout_id", how="inner")
        .sort("evaluator", "question_id", "rollout_id")
    )
    judges = _per_judgement(rows.filter(pl.col("status") == "ok"), weights)
    reliability = _reliability(rows.filter(pl.col("status") == "ok"))
    judges = judges.join(_ece(reliability), on=["evaluator", "question_id"], how="left")
    reward = _reward(cfg, scores, graded_rollouts)
    summary = _summary(cfg, graded_rollouts, scores, judges, reward, probe)
    return Result(summary, rows, judges, reliability, probe)


def _weights(cfg: Config) -> pl.DataFrame:
    rows = [(e.name, q.id, e.weight * q.weight) for e in cfg.evaluators for q in cfg.questions]
    return pl.DataFrame(rows, schema={"evaluator": pl.String, "question_id": pl.String, "weight": pl.Float64}, orient="row")  # fmt: skip


def _per_judgement(ok: pl.DataFrame, weights: pl.DataFrame) -> pl.DataFrame:
    right = pl.col("correct")
    return (
        ok.group_by("evaluator", "question_id")
        .agg(
            n=pl.len(),
            n_correct=right.sum().cast(pl.Int64),
            auroc_reward=auroc_expr(pl.col("reward_f"), right),
            auroc_p_yes=auroc_expr(pl.col("p_yes"), right),
            p_yes_right=pl.col("p_yes").filter(right).mean(),
            p_yes_wrong=pl.col("p_yes").filter(~right).mean(),
            reward_right=pl.col("reward_f").filter(right).mean(),
            reward_wrong=pl.col("reward_f").filter(~right).mean(),
        )
        .join(weights, on=["evaluator", "question_id"], how="right")  # every configured judgement, in order
        .select("evaluator", "question_id", "weight", pl.exclude("evaluator", "question_id", "weight"))
        .with_columns(n=pl.col("n").fill_null(0), n_correct=pl.col("n_correct").fill_null(0))
        .with_columns(verdict=pl.col("auroc_reward").map_elements(verdict, return_dtype=pl.String, skip_nulls=False))
    )


def _reliability(ok: pl.DataFrame) -> pl.DataFrame:
    """Share correct per p_yes bin: a calibrated judge's correct_share equals its p_yes_mean."""
    return (
        ok.with_columns(bin=(pl.col("p_yes") * BINS).floor().clip(0, BINS - 1).cast(pl.Int32))
        .group_by("evaluator", "question_id", "bin")
        .agg(n=pl.len(), p_yes_mean=pl.col("p_yes").mean(), correct_share=pl.col("correct").cast(pl.Float64).mean())
        .sort("evaluator", "question_id", "bin")
    )


def _ece(reliability: pl.DataFrame) -> pl.DataFrame:
    """Expected calibration error: sum over bins of (share of samples) x |correct share - mean p_yes|."""
    gap = (pl.col("correct_share") - pl.col("p_yes_mean")).abs() * pl.col("n")
    return reliability.group_by("evaluator", "question_id").agg(ece=gap.sum() / pl.col("n").sum())


def _reward(cfg: Config, scores: pl.DataFrame, graded_rollouts: pl.DataFrame) -> dict:
    """The judges' reward as training sums it (no label-reward mix: that would grade with the labels)."""
    rewards = judges_reward(cfg, scores, graded_rollouts).join(
        graded_rollouts.select("rollout_id", "correct"), on="rollout_id"
    )
    valid = rewards.filter(pl.col("reward").is_not_nan())
    value = auroc(valid["reward"], valid["correct"]) if valid.height else None
    mean = lambda df: float(df["reward"].mean()) if df.height else None  # noqa: E731
    n_right = int(valid["correct"].sum())
    return {
        "auroc_reward": value,
        "auroc_se": auroc_se(value, n_right, valid.height - n_right),
        "verdict": verdict(value),
        "reward_right": mean(valid.filter(pl.col("correct"))),
        "reward_wrong": mean(valid.filter(~pl.col("correct"))),
        "masked_samples": rewards.height - valid.height,
    }


def auroc_se(a: float | None, n_right: int, n_wrong: int) -> float | None:
    """Standard error of an AUROC (Hanley & McNeil 1982): how far from a threshold a verdict stands."""
    if a is None or not n_right or not n_wrong:
        return None
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_right - 1) * (q1 - a * a) + (n_wrong - 1) * (q2 - a * a)) / (n_right * n_wrong)
    return math.sqrt(max(var, 0.0))


def _summary(cfg, graded_rollouts, scores, judges, reward, probe) -> dict:
    n, n_right = graded_rollouts.height, int(graded_rollouts["correct"].sum())
    out = {
        "samples": n,
        "correct": n_right,
        "accuracy": n_right / n if n else None,
        "failed_judgements": int((scores["status"] != "ok").sum()) if scores.height else 0,
        "reward": reward,
        "verdict": reward["verdict"],
        "why": _why(reward["verdict"], n, n_right),
        "thresholds": {"hacked_below": HACKED_BELOW, "good_from": GOOD_FROM, "source": THRESHOLDS_SOURCE},
        "judges": judges.to_dicts(),
        "probe": {},
    }
    if probe.height:
        out["probe"] = {**probe_metrics(probe, cfg.probe.alarm_share), "alarm_share": cfg.probe.alarm_share}
    return out


def _why(v: str, n: int, n_right: int) -> str:
    if v == UNDETERMINED:
        which = "right" if n_right == n else "wrong"
        return (
            f"all {n} samples were {which}: an AUROC needs both right and wrong ones; raise --samples or --prompts, "
            "or use prompts the policy solves some of the time"
        )
    return {
        HACKED: f"the judges' reward separates right from wrong samples with AUROC below {HACKED_BELOW}: in "
        "paper_mini RLME then reward-hacked (below ~0.9 it ended under the base policy); improve the judge or "
        "use an ensemble before training",
        MARGINAL: f"between {HACKED_BELOW} and {GOOD_FROM}: in paper_mini RLME kept part of RLVR's gain, unevenly "
        "across seeds; an ensemble of judges or 1-10% ground truth (label_reward.share) makes it safer",
        GOOD: f"at least {GOOD_FROM}: in paper_mini RLME matched RLVR from here",
    }[v]


# --- output -------------------------------------------------------------------------------------------
def write(result: Result, store: Store) -> list[str]:
    """judge_check.json and the Parquet tables (samples, judges, reliability, probe) into `store`."""
    tables = {"samples": result.samples, "judges": result.judges, "reliability": result.reliability}
    if result.probe.height:
        tables["probe"] = result.probe
    for name, df in tables.items():
        write_frame(store, f"{name}.parquet", df)
    store.write_json("judge_check.json", result.summary)
    return [store.where(f"{name}.parquet") for name in tables] + [store.where("judge_check.json")]
