"""Proposers: who writes the candidate question sets. Both answer in the YAML of edits.py, so the rules
and a model go through the same parser and the same validation.

    rules   draws from the shipped library assets/robustness_questions.yaml: candidate k adds the k-th
            library question (with its paraphrase), those that target the probe kinds the evidence shows first
    model   any generator (hf, vllm or openai backend, any model reference) asked with the template
            assets/evolve_prompt.txt, once per candidate with its own seed; each evidence list is shown
            with as many entries as fit the model's context (5, 3, 2, 1, then none)
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlme_pipeline import seeds
from rlme_pipeline.backends.session import Backends, max_positions_of
from rlme_pipeline.config import RULES, ProposerConfig, QuestionConfig, VllmConfig
from rlme_pipeline.evolve.edits import MAX_EDITS
from rlme_pipeline.evolve.evidence import render
from rlme_pipeline.models.loading import resolve_ref, weights_version
from rlme_pipeline.models.weights_at import ModelRef
from rlme_pipeline.stages.generate import chat_prompt_ids

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LIBRARY = ASSETS / "robustness_questions.yaml"
TEMPLATE = ASSETS / "evolve_prompt.txt"
ROW_STEPS = (5, 3, 2, 1, 0)  # entries per evidence list, tried in turn until the prompt fits


@dataclass(frozen=True)
class Draft:
    """One proposer answer, before parsing: the raw text, or why there is none."""

    source: str
    text: str | None
    error: str | None = None


def library() -> list[dict]:
    return yaml.safe_load(LIBRARY.read_text(encoding="utf-8"))


def rules(evidence: dict, current: list[QuestionConfig], n: int) -> list[Draft]:
    """Up to n drafts, each adding one library question that the run does not ask yet."""
    fooled = {h["kind"] for h in evidence["probe_hits"]}
    have = {q.id for q in current} | {q.text for q in current}
    entries = [e for e in library() if e["id"] not in have and e["text"] not in have]
    entries.sort(key=lambda e: -len(fooled & set(e["targets"])))  # stable: library order within a tie
    drafts = []
    for e in entries[:n]:
        edit = {k: e[k] for k in ("id", "text", "paraphrase", "weight", "rationale") if k in e}
        drafts.append(Draft(f"rules:{e['id']}", yaml.safe_dump({"edits": [{"op": "add", **edit}]}, sort_keys=False)))
    return drafts


def prompt_text(evidence: dict, current: list[QuestionConfig], rows: int) -> str:
    qs = yaml.safe_dump(
        [{"id": q.id, "text": q.text, "weight": q.weight} for q in current], sort_keys=False, allow_unicode=True
    )
    return string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        questions=qs.strip(), evidence=render(evidence, rows).strip(), max_edits=MAX_EDITS
    )


def fitted_prompt(tok, evidence: dict, current: list[QuestionConfig], budget: int) -> tuple[str, list[int]] | str:
    """(text, token ids) of the largest prompt that leaves room to answer, or why none fits."""
    for rows in ROW_STEPS:
        text = prompt_text(evidence, current, rows)
        ids = chat_prompt_ids(tok, text, None)
        if len(ids) <= budget:
            return text, ids
    return f"the prompt is {len(ids)} tokens even without evidence; the proposer has room for {budget}"


def model_ref(spec: ProposerConfig) -> ModelRef:
    path = resolve_ref(spec.model)
    return ModelRef(path, weights_version(path), spec.dtype, spec.device)


def model(
    spec: ProposerConfig, evidence: dict, current: list[QuestionConfig], n: int, vllm: VllmConfig
) -> tuple[list[Draft], str | None]:
    """n drafts sampled from the proposer (one per seed), and the prompt they answer. A proposer whose
    context cannot hold the prompt gives n drafts that say so: nothing is raised."""
    ref = model_ref(spec)
    budget = max_positions_of(ref.path) - spec.max_new_tokens
    with Backends(vllm) as backends, backends.generator(ref, spec.backend) as (gen, tok):
        fitted = fitted_prompt(tok, evidence, current, budget)
        if isinstance(fitted, str):
            return [Draft(f"{spec.model}#{k}", None, fitted) for k in range(n)], None
        text, ids = fitted
        samples = gen.sample(
            [ids] * n,
            [seeds.derive(spec.seed, "evolve", k) for k in range(n)],
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
        )
        drafts = [
            Draft(f"{spec.model}#{k}", tok.decode(s.token_ids, skip_special_tokens=True)) for k, s in enumerate(samples)
        ]
    return drafts, text


def propose(
    spec: ProposerConfig, evidence: dict, current: list[QuestionConfig], n: int, vllm: VllmConfig
) -> tuple[list[Draft], str | None]:
    if spec.model == RULES:
        return rules(evidence, current, n), None
    return model(spec, evidence, current, n, vllm)
