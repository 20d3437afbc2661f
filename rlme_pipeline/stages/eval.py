"""eval: the policy an iteration's update produced, on held-out prompts (config `eval`, off by default).

One completion per prompt (greedy, or sampled with eval.seed; sample_index 0), then exact-match accuracy
where the prompt has a label (answers.py, with the run's one answer format, as the label reward and the audit
read answers) and, with eval.judges, the judges' reward of that completion: the training reward's formula
(rewards.py) over the same evaluators and questions, as they judge the next iteration (a live-self evaluator
is the evaluated policy). With eval.samples k > 1, k more completions per prompt (sample_index 1..k, drawn
at eval.sample_temperature) give pass@k and maj@k. It observes the policy and changes nothing training
computes; the runner commits it with its iteration.

pass@k is the share of labelled prompts with at least one correct answer among their k samples: n = k
samples, where the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), is exactly that.
maj@k is the share whose most common answer among the k (answers.majority: unanswered samples do not vote,
a tie goes to the answer given first) is correct.
"""

from __future__ import annotations

import polars as pl

from rlme_pipeline import seeds
from rlme_pipeline.algorithm.answers import extract_answer, is_correct, majority, reference_answer, same_answer
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config
from rlme_pipeline.judging.judges import Evaluator, score_rollouts
from rlme_pipeline.stages.aggregate import judges_reward
from rlme_pipeline.stages.generate import Sampling, generate
from rlme_pipeline.storage.schemas import OK

PREFIX = "eval/"  # of the metrics, and of the eval rows' rollout ids


def sampling(cfg: Config, iteration: int) -> Sampling:
    e, g = cfg.eval, cfg.generation
    return Sampling(
        samples=1,
        max_new_tokens=e.max_new_tokens or g.max_new_tokens,
        temperature=e.temperature,
        top_p=g.top_p if e.temperature else 1.0,
        batch_size=g.batch_size,
        seed=(e.seed, "eval", iteration),
        stage="eval",
    )


def samples_sampling(cfg: Config, iteration: int) -> Sampling:
    """The k samples of pass@k / maj@k: sampled (never greedy: k greedy answers are one), seeded apart from
    the one completion."""
    e, g = cfg.eval, cfg.generation
    return Sampling(
        samples=e.samples,
        max_new_tokens=e.max_new_tokens or g.max_new_tokens,
        temperature=e.sample_temperature or g.temperature,
        top_p=g.top_p,
        batch_size=g.batch_size,
        seed=(e.seed, "eval-samples", iteration),
        stage="eval",
    )


def completions(
    cfg: Config, run_id: str, iteration: int, prompts: pl.DataFrame, policy_version: str, gen, tok
) -> pl.DataFrame:
    """generate's rows for the held-out prompts: the one completion each (sample_index 0) and, with
    eval.samples k > 1, the k samples (sample_index 1..k, rollout ids of their own)."""
    one, _ = generate(cfg, run_id, iteration, prompts, policy_version, gen, tok, sampling(cfg, iteration))
    if cfg.eval.samples == 1:
        return one
    more, _ = generate(cfg, run_id, iteration, prompts, policy_version, gen, tok, samples_sampling(cfg, iteration))
    index = more["sample_index"] + 1
    ids = [seeds.rollout_id(run_id, iteration, p, int(s)) for p, s in zip(more["prompt_id"], index)]
    more = more.with_columns(sample_index=index, rollout_id=pl.Series(ids, dtype=pl.String))
    return pl.concat([one, more]).sort("prompt_id", "sample_index")


def evaluate(
    cfg: Config, rollouts: pl.DataFrame, evaluators: list[Evaluator], backends: Backends
) -> tuple[pl.DataFrame, dict]:
    """(eval table, metrics) for held-out rollouts (`completions`' rows). No evaluators: accuracy only.
    Accuracy and the judges' reward are of the one completion per prompt; pass@k / maj@k of the samples."""
    fmt = cfg.answer_format()
    rollouts = rollouts.with_columns(rollout_id=PREFIX + pl.col("rollout_id"))
    table = with_correct(rollouts, fmt)
    one = table.filter(pl.col("sample_index") == 0)
    metrics = {
        f"{PREFIX}prompts": one.height,
        f"{PREFIX}completion_tokens_mean": float(one["completion_tokens"].mean()),
    }
    labelled = one.filter(pl.col("correct").is_not_null())
    if labelled.height:
        metrics[f"{PREFIX}accuracy"] = float(labelled["correct"].mean())
        metrics[f"{PREFIX}labelled"] = labelled.height
    if cfg.eval.samples > 1:
        metrics.update(pass_and_majority(table.filter(pl.col("sample_index") > 0), fmt, cfg.eval.samples))
    if evaluators:
        judged = rollouts.filter(pl.col("sample_index") == 0)
        scores = score_rollouts(judged, evaluators, cfg.questions, cfg.scoring, "eval", backends, label="eval")
        rewards = judges_reward(cfg, scores, judged)
        table = table.drop("reward").join(rewards.select("rollout_id", "reward"), on="rollout_id", how="left")
        valid = table["reward"].filter(table["reward"].is_not_nan())
        metrics[f"{PREFIX}reward_mean"] = float(valid.mean()) if valid.len() else None
        metrics[f"{PREFIX}failed_share"] = float((scores["status"] != OK).mean()) if scores.height else 0.0
    return table.sort("prompt_id", "sample_index"), metrics


def pass_and_majority(samples: pl.DataFrame, fmt: str, k: int) -> dict:
    """pass@k and maj@k over the labelled prompts of the samples table (module docstring), and k; k alone
    without labels."""
    rows = samples.filter(pl.col("label").is_not_null()).sort("prompt_id", "sample_index")
    passed, voted = [], []
    for _, g in rows.group_by("prompt_id", maintain_order=True):
        passed.append(bool(g["correct"].any()))
        vote = majority(g["answer"].to_list(), fmt)
        voted.append(same_answer(vote, reference_answer(g["label"][0], fmt), fmt))
    if not passed:
        return {f"{PREFIX}samples": k}
    return {
        f"{PREFIX}samples": k,
        f"{PREFIX}pass_at_k": sum(passed) / len(passed),
        f"{PREFIX}maj_at_k": sum(voted) / len(voted),
    }


def with_correct(rollouts: pl.DataFrame, fmt: str) -> pl.DataFrame:
    """The eval table's columns: the answer read off each completion, and whether it is correct against
    the label (answers.is_correct: no answer is not correct; null without a label); reward left null."""
    rows = [
        {
            **r,
            "answer": extract_answer(r["completion"], fmt),
            "correct": None if r["label"] is None else is_correct(r["completion"], r["label"], fmt),
            "completion_tokens": len(r["completion_token_ids"]),
        }
        for r in rollouts.iter_rows(named=True)
    ]
    schema = {"answer": pl.String, "correct": pl.Boolean, "completion_tokens": pl.Int32}
    return pl.DataFrame(rows, schema_overrides=schema).with_columns(reward=pl.lit(None, pl.Float64))
