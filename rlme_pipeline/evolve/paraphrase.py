"""The paraphrase of each question of a candidate set, scored beside it at weight 0 to measure how stable the
set's judgements are when the question is put in other words (rank.stability).

Where a paraphrase comes from, first match wins (recorded per question as `source`):

    edit      the `paraphrase:` of the add/reword edit that last gave the question its text (a model
              proposer may write one; the rules proposer copies the library's)
    library   the `paraphrase:` of the entry in assets/robustness_questions.yaml with the same text
    template  TEMPLATE with the question filled in: deterministic, for questions no one paraphrased (the
              user's own). It is a weak paraphrase: it only reframes the question and keeps its words, so it
              tests sensitivity to surface form, not to rewording, and its stability reads high.

A paraphrase keeps its question's answer tokens, so it is judged exactly like its question; its id is the
question's with edits.PARAPHRASE_SUFFIX, which no edit may use.
"""

from __future__ import annotations

from rlme_pipeline.config import QuestionConfig
from rlme_pipeline.evolve.edits import PARAPHRASE_SUFFIX

TEMPLATE = "Answer yes or no: {question}"


def paraphrases(questions: list[QuestionConfig], from_edits: dict[str, str], library: list[dict]) -> list[dict]:
    """One record per question: {question_id, id, text, source}."""
    from_library = {e["text"]: e["paraphrase"] for e in library if e.get("paraphrase")}
    out = []
    for q in questions:
        if q.id in from_edits:
            text, source = from_edits[q.id], "edit"
        elif q.text in from_library:
            text, source = from_library[q.text], "library"
        else:
            text, source = TEMPLATE.format(question=q.text), "template"
        out.append({"question_id": q.id, "id": q.id + PARAPHRASE_SUFFIX, "text": text, "source": source})
    return out


def as_questions(records: list[dict], questions: list[QuestionConfig]) -> list[QuestionConfig]:
    """The paraphrases as weight-0 questions with their question's answer tokens: they change no reward."""
    by_id = {q.id: q for q in questions}
    return [
        by_id[r["question_id"]].model_copy(update={"id": r["id"], "text": r["text"], "weight": 0.0}) for r in records
    ]


def pairs(records: list[dict]) -> dict[str, str]:
    """question id -> its paraphrase's id."""
    return {r["question_id"]: r["id"] for r in records}
