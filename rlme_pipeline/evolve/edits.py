"""A proposal is text; this module turns it into a question set or says, in one line, why it cannot.

The proposer (a model or the rules) answers with YAML (a fenced ```yaml block or bare):

    edits:
      - {op: add, id: states_answer, text: "Does the response state an actual answer?", weight: 1.0,
         rationale: "vacuous self-assertions were judged positive"}
      - {op: reword, id: correct, text: "Is the final answer correct?", rationale: "..."}
      - {op: reweight, id: logical, weight: 0.25, rationale: "..."}
      - {op: drop, id: length, rationale: "..."}

An `add` or `reword` may carry `paraphrase:`, the same question in other words; it is not part of the set,
only scored beside it at weight 0 to measure stability under paraphrase (paraphrase.py, rank.py).

Edits apply in order to the run's current questions; the result is validated with the config's own
`QuestionConfig`. Anything else (noise, prose, a missing rationale, an edit of an unknown question, a set
with no positive weight) is a `Rejected` with the reason: recorded in the proposal, never raised.
Added and reworded questions keep the answer tokens the run already reads (the first question's for an
added one), so a candidate never fails on an answer that is not one token for an evaluator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import yaml
from pydantic import ValidationError

from rlme_pipeline.config import QuestionConfig, describe_errors

OPS = {
    "add": {"id", "text", "weight", "paraphrase"},
    "reword": {"id", "text", "paraphrase"},
    "reweight": {"id", "weight"},
    "drop": {"id"},
}
OPTIONAL = {"add": {"weight", "paraphrase"}, "reword": {"paraphrase"}}  # an added question's weight defaults to 1.0
PARAPHRASE_SUFFIX = ".paraphrase"  # question ids ending so are reserved for the paraphrases scored beside a set
MAX_EDITS, MAX_QUESTIONS, MAX_TEXT, MAX_RATIONALE = 8, 16, 300, 240
_FENCE = re.compile(r"```(?:ya?ml|json)?\s*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Accepted:
    edits: list[dict]  # as given, each with its rationale
    questions: list[QuestionConfig]
    paraphrases: dict[str, str]  # question id -> the paraphrase its last add/reword gave, where one did


@dataclass(frozen=True)
class Rejected:
    reason: str


def body(text: str) -> str:
    """The YAML of an answer: the first fenced block if there is one, else the whole text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def parse(text: str, current: list[QuestionConfig]) -> Accepted | Rejected:
    """The candidate question set `text` proposes, or why it proposes none."""
    try:
        data = yaml.safe_load(body(text))
    except yaml.YAMLError as e:
        return Rejected(f"not YAML ({' '.join(str(e).split())[:200]})")
    if not isinstance(data, dict) or not isinstance(data.get("edits"), list):
        return Rejected(f"expected a mapping with a list `edits`, got {type(data).__name__}")
    edits = data["edits"]
    if not 1 <= len(edits) <= MAX_EDITS:
        return Rejected(f"edits: {len(edits)} given; give 1 to {MAX_EDITS}")
    questions = {q.id: q for q in current}
    paraphrases: dict[str, str] = {}
    for n, e in enumerate(edits):
        problem = _apply(e, questions, current[0])
        if problem:
            return Rejected(f"edits[{n}]: {problem}")
        if e["op"] in ("add", "reword", "drop"):  # a new text makes an older paraphrase stale
            paraphrases.pop(e["id"], None)
        if "paraphrase" in e:
            paraphrases[e["id"]] = e["paraphrase"].strip()
    return _validated(edits, list(questions.values()), current, paraphrases)


def _apply(e, questions: dict[str, QuestionConfig], template: QuestionConfig) -> str | None:
    """Apply one edit to `questions` in place; the problem in words, or None."""
    if not isinstance(e, dict):
        return f"expected a mapping, got {type(e).__name__}"
    op = e.get("op")
    if op not in OPS:
        return f"op {op!r} is not one of {sorted(OPS)}"
    rationale = e.get("rationale")
    if not isinstance(rationale, str) or not rationale.strip() or "\n" in rationale.strip():
        return "rationale: give one line saying why"
    if len(rationale) > MAX_RATIONALE:
        return f"rationale: {len(rationale)} characters; keep it to one line of at most {MAX_RATIONALE}"
    given = set(e) - {"op", "rationale"}
    if extra := given - OPS[op]:
        return f"{op} takes {sorted(OPS[op])}, not {sorted(extra)}"
    if missing := OPS[op] - OPTIONAL.get(op, set()) - given:
        return f"{op} needs {sorted(missing)}"
    qid = e["id"]
    if not isinstance(qid, str):
        return f"id {qid!r}: a question id is a string"
    if qid.endswith(PARAPHRASE_SUFFIX):
        return f"id {qid!r}: ids ending in {PARAPHRASE_SUFFIX!r} are reserved for paraphrases; choose another"
    if (op == "add") == (qid in questions):
        return f"id {qid!r}: " + ("already a question; reword or reweight it" if op == "add" else "no such question")
    if "text" in e and (not isinstance(e["text"], str) or not 0 < len(e["text"].strip()) <= MAX_TEXT):
        return f"text: give the question as a string of 1 to {MAX_TEXT} characters"
    if "paraphrase" in e and (not isinstance(e["paraphrase"], str) or not 0 < len(e["paraphrase"].strip()) <= MAX_TEXT):
        return f"paraphrase: give the question in other words, a string of 1 to {MAX_TEXT} characters"
    if "weight" in e and (isinstance(e["weight"], bool) or not isinstance(e["weight"], (int, float))):
        return f"weight {e['weight']!r}: a number"
    if "weight" in e and not math.isfinite(e["weight"]):
        return f"weight {e['weight']!r}: a finite number"
    try:
        if op == "drop":
            del questions[qid]
        elif op == "add":
            fields = {"text": e["text"].strip(), "weight": e.get("weight", 1.0)}
            answers = {"positive": template.positive, "negative": template.negative}
            questions[qid] = QuestionConfig(id=qid, **fields, **answers)
        else:
            changes = {k: (e[k].strip() if k == "text" else e[k]) for k in OPS[op] - {"id", "paraphrase"}}
            questions[qid] = QuestionConfig.model_validate({**questions[qid].model_dump(), **changes})
    except ValidationError as err:
        return describe_errors(err, "the question")
    return None


def _validated(
    edits: list, questions: list[QuestionConfig], current: list[QuestionConfig], paraphrases: dict[str, str]
) -> Accepted | Rejected:
    if not questions:
        return Rejected("the edits drop every question")
    if len(questions) > MAX_QUESTIONS:
        return Rejected(f"{len(questions)} questions; at most {MAX_QUESTIONS}")
    if not any(q.weight > 0 for q in questions):
        return Rejected("no question has a positive weight: the reward would only punish")
    if identity(questions) == identity(current):
        return Rejected("the edits leave the question set as it is")
    return Accepted(edits, questions, paraphrases)


def identity(questions: list[QuestionConfig]) -> list[tuple]:
    """What a question set computes (ids only name it): texts, answers and weights, in any order."""
    return sorted((q.sha(), q.weight) for q in questions)
