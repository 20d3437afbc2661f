"""Proposal parsing (every malformed answer is a reason, never an exception) and the ranking rule."""

from __future__ import annotations

import pytest

from rlme_pipeline.audit.labels import auroc
from rlme_pipeline.config import QuestionConfig
from rlme_pipeline.evolve import edits, rank

CURRENT = [
    QuestionConfig(id="correct", text="Is the answer correct?", weight=1.0),
    QuestionConfig(id="logical", text="Is it logical?", weight=0.5, positive=["Yes"], negative=["No"]),
]


def test_each_op_applies_in_order_and_keeps_the_answer_tokens():
    text = """Here you go:
```yaml
edits:
  - {op: add, id: states, text: " Does it state an answer? ", weight: 2, rationale: vacuous answers pass}
  - {op: reword, id: logical, text: "Does it follow?", rationale: clearer}
  - {op: reweight, id: correct, weight: 0.25, rationale: weak}
  - {op: drop, id: states, rationale: changed my mind}
  - {op: add, id: penal, text: "Is it empty?", weight: -1, rationale: penalise empty}
```"""
    got = edits.parse(text, CURRENT)
    assert isinstance(got, edits.Accepted), got
    q = {x.id: x for x in got.questions}
    assert list(q) == ["correct", "logical", "penal"]
    assert q["correct"].weight == 0.25 and q["correct"].text == "Is the answer correct?"
    assert q["logical"].text == "Does it follow?" and q["logical"].positive == ["Yes"]  # reword keeps answers
    assert q["penal"].weight == -1 and q["penal"].positive == CURRENT[0].positive  # add takes the first's
    assert len(got.edits) == 5


BAD = {
    "noise": ("\x02garbage: [", "not YAML"),
    "prose": ("I would add a question about answers.", "expected a mapping with a list `edits`"),
    "no edits": ("edits: []", "edits: 0 given"),
    "unknown op": ("edits: [{op: rename, id: correct, rationale: x}]", "op 'rename' is not one of"),
    "no rationale": ("edits: [{op: drop, id: logical}]", "edits[0]: rationale"),
    "two-line rationale": ('edits: [{op: drop, id: logical, rationale: "a\\nb"}]', "rationale: give one line"),
    "extra field": ("edits: [{op: drop, id: logical, weight: 1, rationale: x}]", "drop takes ['id'], not ['weight']"),
    "missing text": ("edits: [{op: add, id: new, rationale: x}]", "add needs ['text']"),
    "unknown id": ("edits: [{op: reword, id: nope, text: 'Is it?', rationale: x}]", "id 'nope': no such question"),
    "duplicate add": ("edits: [{op: add, id: correct, text: 'Is it?', rationale: x}]", "already a question"),
    "bad weight": ("edits: [{op: reweight, id: correct, weight: heavy, rationale: x}]", "weight 'heavy': a number"),
    "inf weight": ("edits: [{op: reweight, id: correct, weight: .inf, rationale: x}]", "a finite number"),
    "empty text": ("edits: [{op: reword, id: correct, text: '  ', rationale: x}]", "text: give the question"),
    "drop all": (
        "edits: [{op: drop, id: correct, rationale: x}, {op: drop, id: logical, rationale: y}]",
        "drop every question",
    ),
    "only penalties": (
        "edits: [{op: reweight, id: correct, weight: -1, rationale: x}, {op: drop, id: logical, rationale: y}]",
        "no question has a positive weight",
    ),
    "no change": ("edits: [{op: reweight, id: correct, weight: 1.0, rationale: x}]", "leave the question set as it is"),
    "not a mapping": ("edits: [drop logical]", "edits[0]: expected a mapping"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_proposals_are_rejected_with_the_reason(case):
    text, reason = BAD[case]
    got = edits.parse(text, CURRENT)
    assert isinstance(got, edits.Rejected) and reason in got.reason, got


def m(win, auroc=0.6, spread=1.0) -> dict:
    return {"probe_win_share": win, "label_auroc": auroc, "spread": spread}


def test_choice_gates_then_takes_the_lowest_probe_win_share():
    base = m(0.5)
    measured = [(0, m(0.4)), (1, m(0.1, spread=0.4)), (2, m(0.2, auroc=0.5)), (3, m(0.3)), (4, m(0.3, auroc=0.7))]
    chosen, why_not, why = rank.choose(base, measured, rank.Criteria())
    assert why_not[1].startswith("spread") and why_not[2].startswith("label AUROC")  # gated out
    assert why_not[0] is None and why_not[3] is None
    assert chosen == 4, why  # 0.3 ties with candidate 3; the higher AUROC breaks it


def test_no_candidate_is_chosen_unless_it_beats_the_current_set():
    chosen, _, why = rank.choose(m(0.3), [(0, m(0.3)), (1, m(0.35))], rank.Criteria())
    assert chosen is None and "current questions stay" in why


def test_auroc_counts_ties_half():
    """The one AUROC (audit/labels.py) that the audit, the ranking and paper_mini share."""
    assert auroc([1.0, 2.0, 2.0, 3.0], [False, True, False, True]) == pytest.approx(0.875)
    assert auroc([1.0, 2.0], [True, True]) is None
