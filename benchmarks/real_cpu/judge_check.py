"""(a) Check the judge before any RL: does SmolLM2's P(yes) separate good from bad answers of the base policy?

paper_mini (docs/paper_mini.md) found the line a user needs: on the policy's own samples, a judge whose
AUROC is below ~0.9 makes RLME reward-hack, ~0.98 matches RLVR. So before training on a judge, sample the
base policy as training will (the recipe's prompts, template, temperature, group size), ask the judge the
recipe's questions (and the alternative phrasings below), and compute, per question and for the reward:

    AUROC against correctness   (the label, read with the run's answers.format: what "Is the answer correct?" asks)
    AUROC against the format    (the rule `ends_with_answer`: what the format question asks)

for three readings of the judge: raw log P(yes) (reward_form logp), P(yes)/(P(yes)+P(no)) (norm_logp), and
the recipe's reward. `rlme judge-check` (rlme_pipeline/judging/check.py, being written beside this) will
compute the same table from a config; `check()` below is the seam to hand over to it.
"""

from __future__ import annotations

import polars as pl

from benchmarks.real_cpu.recipe import STEER, ends_with_answer
from rlme_pipeline.algorithm.answers import is_correct
from rlme_pipeline.audit.labels import auroc
from rlme_pipeline.backends.session import Backends
from rlme_pipeline.config import Config, QuestionConfig
from rlme_pipeline.data import Prompts, prompts_for_iteration
from rlme_pipeline.judging.judges import Evaluator
from rlme_pipeline.models.loading import resolve_ref, weights_version
from rlme_pipeline.models.weights_at import ModelRef, initial_policy
from rlme_pipeline.stages.aggregate import rewards_for
from rlme_pipeline.stages.generate import Sampling, generate
from rlme_pipeline.stages.score import score

# Phrasings of the format question measured beside the recipe's own ("Does the response follow the
# requested answer format?"): the literal one, and one that names the sentence.
ALTERNATIVES = [
    QuestionConfig(id="ends_literal", text="Does the response end with 'The answer is N.' where N is a number?"),
    QuestionConfig(
        id="states_answer", text="Does the response state the final answer as 'The answer is' followed by a number?"
    ),  # fmt: skip
]


def base_samples(cfg: Config, prompts: int, backends: Backends) -> pl.DataFrame:
    """The base policy's own samples: `prompts` prompts (the recipe's first iterations' slices) x group size,
    drawn exactly as the recipe's generate stage draws them."""
    table = Prompts(cfg).train()
    per = cfg.data.prompts_per_iteration
    chosen = pl.concat([prompts_for_iteration(table, cfg, i) for i in range(-(-prompts // per))]).head(prompts)
    g = cfg.generation
    sampling = Sampling(g.group_size, g.max_new_tokens, g.temperature, g.top_p, g.batch_size, (cfg.run.seed, "judge-check"))  # fmt: skip
    ref = initial_policy(cfg)
    with backends.generator(ref) as (gen, tok):
        rollouts, _ = generate(cfg, cfg.run.id, 0, chosen, ref.version, gen, tok, sampling)
    return rollouts


def evaluators(cfg: Config) -> list[Evaluator]:
    """The recipe's evaluators (frozen others), resolved without a run: the judge-check comes before one."""
    out = []
    for ev in cfg.evaluators:
        path = resolve_ref(cfg.resolve(ev.model))
        out.append(Evaluator(ev.name, ModelRef(path, weights_version(path), ev.dtype, ev.device)))
    return out


def check(cfg: Config, rollouts: pl.DataFrame, backends: Backends) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per-question table, per-sample table). The seam for `rlme judge-check`: the same AUROCs from a
    config and the base policy's samples."""
    questions = list(cfg.questions) + ALTERNATIVES
    scores, _ = score(cfg.model_copy(update={"questions": questions}), rollouts, evaluators(cfg), backends)
    fmt = cfg.answer_format()
    truth = rollouts.select(
        "rollout_id",
        "completion",
        pl.struct("completion", "label")
        .map_elements(lambda r: is_correct(r["completion"], r["label"], fmt), pl.Boolean)
        .alias("correct"),  # fmt: skip
        pl.col("completion").map_elements(ends_with_answer, pl.Boolean).alias("format_ok"),
    )
    rewards = rewards_for(cfg, scores.filter(pl.col("question_id").is_in([q.id for q in cfg.questions])), rollouts)
    rows = []
    judged = scores.join(truth, on="rollout_id")
    for (ev, qid), g in judged.group_by("evaluator", "question_id", maintain_order=True):
        rows.append(_row(f"{ev}: {qid}", g["logp_yes"], g["p_yes"], g["correct"], g["format_ok"]))
    r = rewards.join(truth, on="rollout_id")
    rows.append(_row(f"reward ({cfg.scoring.reward_form})", r["reward"], None, r["correct"], r["format_ok"]))
    return pl.DataFrame(rows), truth


def _row(name, logp, p_norm, correct, format_ok) -> dict:
    return {
        "judgement": name,
        "AUROC correct, log P(yes)": auroc(logp, correct),
        "AUROC correct, P(yes) norm": auroc(p_norm, correct) if p_norm is not None else None,
        "AUROC format, log P(yes)": auroc(logp, format_ok),
        "AUROC format, P(yes) norm": auroc(p_norm, format_ok) if p_norm is not None else None,
    }


def summary(truth: pl.DataFrame) -> str:
    n = truth.height
    return (
        f"{n} base-policy samples: {int(truth['correct'].sum())} correct ({truth['correct'].mean():.1%}), "
        f"{int(truth['format_ok'].sum())} end with 'The answer is N.' ({truth['format_ok'].mean():.1%}); "
        f"the steered question is '{STEER}'"
    )
