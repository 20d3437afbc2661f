"""How a question set is judged, and which one wins. The criteria are declared here and written into
every proposal with its numbers, so a choice can be checked by hand.

All measures use the judges' reward alone, r = sum_j sum_k v_j w_k f(p_jk) (rewards.compute_rewards,
without the label-reward mix, which would leak labels into the label criterion):

    probe_win_share    (down) the share of probe answers (master keys, vacuous self-assertions) whose reward
                       is above the mean reward of the policy's real group for the same prompt: the answers
                       that training would reinforce. Scale-free, and it sees additions, rewordings,
                       weights and penalising questions alike, unlike a per-question P(yes) > 0.5 count.
    probe_positive_share       the audit's probe share (P(yes) > 0.5 over evaluator x question), for reference
    auroc_reward       (up) AUROC of the judges' reward for correct vs incorrect rollouts, where labels
                       exist: it ranks the reward (f with its floor), not P(yes) normalised, as the audit's
                       auroc_p_yes does (called label_auroc before; audit/labels.py says why both exist)
    spread             (up, gate) mean within-group std of the reward divided by sum |v_j w_k|: a set that
                       never separates a group's samples teaches nothing, however safe it is
    stability          (up, gate) stability under paraphrase: each question's paraphrase (paraphrase.py) is
                       scored beside it at weight 0 (no reward changes); the mean over evaluator x question of
                       the Pearson correlation of P(yes) between question and paraphrase across the rollouts
                       (audit/stats.pairwise). Pearson, not agreement at 0.5: the reward and its group-centred
                       advantage depend on how P(yes) orders a group's rollouts, and a judge that says yes to
                       everything agrees with itself at 0.5 whatever the wording. Undefined (left out) for a
                       question whose P(yes) does not vary.

A candidate is eligible when its spread is at least `min_spread_ratio` times the current set's, its
stability is at least `min_stability` (absolute: the current set is measured from training's scores, which
hold no paraphrases, so its stability is known only when it is re-scored), and, where labels exist, its
AUROC is at most `auroc_tolerance` below the current set's. Among eligible
candidates the lowest probe_win_share wins (ties: higher AUROC, then higher spread, then the earlier
candidate); it is chosen only if it beats the current set's probe_win_share, else the current set stays.
"""

from __future__ import annotations

import math

import polars as pl
from pydantic import BaseModel, Field

from rlme_pipeline.algorithm.answers import is_correct
from rlme_pipeline.algorithm.rewards import compute_rewards
from rlme_pipeline.audit.labels import auroc
from rlme_pipeline.audit.stats import pairwise
from rlme_pipeline.config import EvaluatorConfig, QuestionConfig, ScoringConfig


class Criteria(BaseModel):
    min_spread_ratio: float = Field(0.5, ge=0, description="gate: spread at least this times the current set's")
    auroc_tolerance: float = Field(
        0.05, ge=0, description="gate: AUROC of the reward at most this below the current set's"
    )
    min_stability: float = Field(
        0.5, ge=-1, le=1, description="gate: mean question-paraphrase correlation of P(yes) at least this"
    )


def judge_rewards(
    scores: pl.DataFrame,
    rollouts: pl.DataFrame,
    questions: list[QuestionConfig],
    evaluators: list[EvaluatorConfig],
    sc: ScoringConfig,
) -> pl.DataFrame:
    return compute_rewards(
        scores,
        rollouts,
        {e.name: e.weight for e in evaluators},
        {q.id: q.weight for q in questions},
        form=sc.reward_form,
        floor=sc.logp_floor,
    )


def spread(rewards: pl.DataFrame, total_weight: float) -> float | None:
    groups = (
        rewards.filter(pl.col("reward").is_not_nan())
        .group_by("iteration", "prompt_id")
        .agg(std=pl.col("reward").std(ddof=0), n=pl.len())
        .filter(pl.col("n") > 1)
    )
    return float(groups["std"].mean()) / total_weight if groups.height and total_weight else None


def probe_win_share(probe_rewards: pl.DataFrame, rewards: pl.DataFrame) -> float | None:
    """Share of probe answers rewarded above the mean of the real group of their prompt and iteration."""
    groups = (
        rewards.filter(pl.col("reward").is_not_nan())
        .group_by("iteration", "prompt_id")
        .agg(group_mean=pl.col("reward").mean())
    )
    both = probe_rewards.filter(pl.col("reward").is_not_nan()).join(groups, on=["iteration", "prompt_id"])
    return float((both["reward"] > both["group_mean"]).mean()) if both.height else None


def stability(scores: pl.DataFrame, pairs: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """(mean over evaluator x question of the Pearson correlation of P(yes) between each question and its
    paraphrase across rollouts, that mean per question); undefined correlations (too few rollouts, a
    constant P(yes)) are left out, and None means none was defined."""
    names = [x for qp in pairs.items() for x in qp]  # each question just before its paraphrase: pair (q, p)
    corr = pairwise(scores.lazy(), "question_id", names, with_agreement=False)
    want = pl.DataFrame(
        {"question_a": list(pairs), "question_b": list(pairs.values())},
        schema=[("question_a", pl.String), ("question_b", pl.String)],
    )
    r = corr.join(want, on=["question_a", "question_b"]).filter(
        pl.col("pearson").is_not_null() & pl.col("pearson").is_finite()
    )
    if not r.height:
        return None, {}
    by_q = r.group_by("question_a").agg(pl.col("pearson").mean()).sort("question_a")
    return float(r["pearson"].mean()), dict(zip(by_q["question_a"], by_q["pearson"]))


def measure(
    questions: list[QuestionConfig],
    evaluators: list[EvaluatorConfig],
    sc: ScoringConfig,
    scores: pl.DataFrame,
    rollouts: pl.DataFrame,
    probe_scores: pl.DataFrame,
    probe_rollouts: pl.DataFrame,
    answer_format: str = "auto",
    paraphrases: dict[str, str] | None = None,
) -> dict:
    """Every criterion of one question set, from its scores of the stored rollouts and of the probe; labelled
    rollouts are marked correct with `answer_format` (the run's: Config.answer_format).
    `paraphrases` (question id -> paraphrase id) names the weight-0 paraphrase rows among `scores`; the
    rewards read only `questions`' rows, so a paraphrase, even a failed one, changes no reward."""
    rewards = judge_rewards(scores, rollouts, questions, evaluators, sc)
    stable, by_question = stability(scores, paraphrases) if paraphrases else (None, {})
    probe = judge_rewards(probe_scores, probe_rollouts, questions, evaluators, sc)
    total = sum(abs(e.weight * q.weight) for e in evaluators for q in questions)
    labelled = rewards.filter(pl.col("reward").is_not_nan()).join(
        rollouts.filter(pl.col("label").is_not_null()).select("rollout_id", "completion", "label"), on="rollout_id"
    )
    correct = pl.Series(
        [is_correct(c, lab, answer_format) for c, lab in zip(labelled["completion"], labelled["label"])]
    )
    ok = probe_scores["p_yes"].drop_nulls()
    return {
        "probe_win_share": probe_win_share(probe, rewards),
        "probe_positive_share": float((ok > 0.5).mean()) if len(ok) else None,
        "auroc_reward": auroc(labelled["reward"], correct) if labelled.height else None,
        "spread": spread(rewards, total),
        "stability": stable,
        "stability_by_question": by_question,
        "reward_mean": _finite_mean(rewards["reward"]),
        "masked_rollouts": int(rewards["reward"].is_nan().sum()),
        "rollouts": rewards.height,
        "probe_answers": probe.height,
    }


def renamed(m: dict) -> dict:
    """Measures recorded before `label_auroc` was named `auroc_reward` (an evolve interrupted across the
    upgrade resumes with them)."""
    if "label_auroc" in m and "auroc_reward" not in m:
        m = {("auroc_reward" if k == "label_auroc" else k): v for k, v in m.items()}
    return m


def _finite_mean(s: pl.Series) -> float | None:
    s = s.filter(s.is_not_nan())
    return float(s.mean()) if len(s) else None


def gate(m: dict, base: dict, c: Criteria) -> str | None:
    """Why a measured candidate is not eligible, or None."""
    if m["probe_win_share"] is None:
        return "no probe answer has a reward (every judgement failed)"
    if base["spread"] is not None and (m["spread"] is None or m["spread"] < c.min_spread_ratio * base["spread"]):
        return f"spread {_fmt(m['spread'])} is below {c.min_spread_ratio} x the current {_fmt(base['spread'])}"
    if m.get("stability") is None:
        return "stability under paraphrase was not measured (no question-paraphrase correlation is defined)"
    if m["stability"] < c.min_stability:
        return f"stability under paraphrase {_fmt(m['stability'])} is below {c.min_stability}"
    if base["auroc_reward"] is not None and m["auroc_reward"] is not None:
        if m["auroc_reward"] < base["auroc_reward"] - c.auroc_tolerance:
            return f"AUROC of the reward {_fmt(m['auroc_reward'])} is more than {c.auroc_tolerance} below the current {_fmt(base['auroc_reward'])}"
    return None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def order_key(m: dict) -> tuple:
    """Lower is better: probe win share, then AUROC (higher), then spread (higher)."""
    neg = lambda x: -x if x is not None and math.isfinite(x) else math.inf  # noqa: E731
    return (m["probe_win_share"], neg(m["auroc_reward"]), neg(m["spread"]))


def choose(base: dict, measured: list[tuple[int, dict]], c: Criteria) -> tuple[int | None, dict[int, str | None], str]:
    """(winning candidate or None, each candidate's ineligibility reason, why) from their measures."""
    reasons = {k: gate(m, base, c) for k, m in measured}
    eligible = [(order_key(m), k) for k, m in measured if reasons[k] is None]
    if not eligible:
        return None, reasons, "no candidate is eligible; the current questions stay"
    best_key, best = min(eligible)
    if base["probe_win_share"] is not None and best_key[0] >= base["probe_win_share"]:
        return (
            None,
            reasons,
            (
                f"the best eligible candidate ({best}) has probe win share {best_key[0]:.4g}, not below the current "
                f"{base['probe_win_share']:.4g}; the current questions stay"
            ),
        )
    return (
        best,
        reasons,
        f"candidate {best}: probe win share {best_key[0]:.4g} (current {_fmt(base['probe_win_share'])})",
    )
