"""Proposal parsing (every malformed answer is a reason, never an exception) and the ranking rule."""

from __future__ import annotations

import math

import polars as pl
import pytest

from rlme_pipeline.algorithm.rewards import compute_rewards
from rlme_pipeline.audit.labels import auroc
from rlme_pipeline.config import QuestionConfig
from rlme_pipeline.evolve import edits, paraphrase, rank
from rlme_pipeline.storage.schemas import OK

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


def m(win, auroc=0.6, spread=1.0, stability=0.9) -> dict:
    return {"probe_win_share": win, "auroc_reward": auroc, "spread": spread, "stability": stability}


def test_choice_gates_then_takes_the_lowest_probe_win_share():
    base = m(0.5)
    measured = [(0, m(0.4)), (1, m(0.1, spread=0.4)), (2, m(0.2, auroc=0.5)), (3, m(0.3)), (4, m(0.3, auroc=0.7))]
    measured += [(5, m(0.05, stability=0.4)), (6, m(0.05, stability=None))]
    chosen, why_not, why = rank.choose(base, measured, rank.Criteria())
    assert why_not[1].startswith("spread") and why_not[2].startswith("AUROC of the reward")  # gated out
    assert why_not[5].startswith("stability under paraphrase 0.4 is below 0.5")
    assert why_not[6].startswith("stability under paraphrase was not measured")
    assert why_not[0] is None and why_not[3] is None
    assert chosen == 4, why  # 0.3 ties with candidate 3; the higher AUROC breaks it


def test_measures_recorded_as_label_auroc_still_rank():
    """An evolve measured before `label_auroc` became `auroc_reward`, finished after: the same choice."""
    old = lambda win, auroc: {k.replace("auroc_reward", "label_auroc"): v for k, v in m(win, auroc).items()}  # noqa: E731
    base, measured = old(0.5, 0.6), [(0, old(0.3, 0.6)), (1, old(0.3, 0.7)), (2, old(0.2, 0.4))]
    chosen, why_not, _ = rank.choose(rank.renamed(base), [(k, rank.renamed(x)) for k, x in measured], rank.Criteria())
    assert chosen == 1 and why_not[2].startswith("AUROC of the reward 0.4")
    assert rank.renamed(m(0.1)) == m(0.1)


def test_no_candidate_is_chosen_unless_it_beats_the_current_set():
    chosen, _, why = rank.choose(m(0.3), [(0, m(0.3)), (1, m(0.35))], rank.Criteria())
    assert chosen is None and "current questions stay" in why


def test_auroc_counts_ties_half():
    """The one AUROC (audit/labels.py) that the audit, the ranking and paper_mini share."""
    assert auroc([1.0, 2.0, 2.0, 3.0], [False, True, False, True]) == pytest.approx(0.875)
    assert auroc([1.0, 2.0], [True, True]) is None


def test_paraphrases_come_from_the_edit_then_the_library_then_the_template():
    text = """edits:
  - {op: add, id: states, text: "Does it state an answer?", paraphrase: " Is an answer given? ", rationale: x}
  - {op: reword, id: logical, text: "Does it follow?", rationale: clearer}
"""
    got = edits.parse(text, CURRENT)
    assert isinstance(got, edits.Accepted) and got.paraphrases == {"states": "Is an answer given?"}
    library = [{"text": "Does it follow?", "paraphrase": "Is it a consequence?"}]
    recs = {r["question_id"]: r for r in paraphrase.paraphrases(got.questions, got.paraphrases, library)}
    assert [recs[q]["source"] for q in ("correct", "logical", "states")] == ["template", "library", "edit"]
    assert recs["correct"]["text"] == "Answer yes or no: Is the answer correct?"
    qs = paraphrase.as_questions(list(recs.values()), got.questions)
    assert {q.id for q in qs} == {"correct.paraphrase", "logical.paraphrase", "states.paraphrase"}
    assert all(q.weight == 0 for q in qs) and qs[1].positive == ["Yes"]  # logical's answer tokens
    # a reword without a paraphrase drops the stale one; the reserved suffix and a bad paraphrase are refused
    stale = edits.parse(text + '  - {op: reword, id: states, text: "Is there one?", rationale: y}\n', CURRENT)
    assert stale.paraphrases == {}
    bad = edits.parse('edits: [{op: add, id: a.paraphrase, text: "Is it?", rationale: x}]', CURRENT)
    assert isinstance(bad, edits.Rejected) and "reserved for paraphrases" in bad.reason
    bad = edits.parse('edits: [{op: reweight, id: correct, weight: 2, paraphrase: "x", rationale: x}]', CURRENT)
    assert isinstance(bad, edits.Rejected) and "not ['paraphrase']" in bad.reason


def _scores(table: dict[tuple[str, str], list[float]]) -> pl.DataFrame:
    """Hand-made scores: (evaluator, question) -> P(yes) of rollouts r0, r1, ..."""
    rows = [
        {"rollout_id": f"r{i}", "evaluator": e, "question_id": q, "p_yes": p, "logp_yes": math.log(p), "status": OK}
        for (e, q), ps in table.items()
        for i, p in enumerate(ps)
    ]
    return pl.DataFrame(rows)


def test_stability_is_the_mean_question_paraphrase_correlation():
    a, b = [0.1, 0.5, 0.9, 0.3], [0.2, 0.4, 0.6, 0.8]
    scores = _scores(
        {
            ("e1", "q1"): a,
            ("e1", "q1.paraphrase"): [2 * x / 3 for x in a],  # pearson 1: same order, other scale
            ("e1", "q2"): b,
            ("e1", "q2.paraphrase"): b[::-1],  # pearson -1
            ("e2", "q1"): a,
            ("e2", "q1.paraphrase"): b,  # pearson of a with b
            ("e2", "q2"): a,  # q2 equals q1 for e2: a correlation against the wrong question reads 1
            ("e2", "q2.paraphrase"): [0.5] * 4,  # constant: undefined, left out
        }
    )
    r_ab = float(pl.DataFrame({"a": a, "b": b}).select(pl.corr("a", "b")).item())
    got, by_q = rank.stability(scores, {"q1": "q1.paraphrase", "q2": "q2.paraphrase"})
    assert got == pytest.approx((1 - 1 + r_ab) / 3)
    assert by_q == pytest.approx({"q1": (1 + r_ab) / 2, "q2": -1.0})
    assert rank.stability(scores, {"q2": "q2.paraphrase"})[0] == pytest.approx(-1.0)


def test_a_zero_weight_paraphrase_leaves_every_reward_identical():
    p = [0.1, 0.5, 0.9, 0.3]
    base = {("e1", "q1"): p, ("e1", "q2"): p[::-1], ("e2", "q1"): [0.7] * 4, ("e2", "q2"): [0.2, 0.3, 0.4, 0.6]}
    para = {(e, q + ".paraphrase"): [0.33, 0.01, 0.99, 0.5] for (e, q) in base}
    rollouts = pl.DataFrame({"rollout_id": [f"r{i}" for i in range(4)], "prompt_id": ["a", "a", "b", "b"]})
    rollouts = rollouts.with_columns(iteration=pl.lit(0))

    def rewards(scores, weights):
        return compute_rewards(scores, rollouts, {"e1": 1.0, "e2": 0.5}, weights, form="logp", floor=-13.8)

    qw = {"q1": 1.0, "q2": -0.5}
    without = rewards(_scores(base), qw)
    with_para = rewards(_scores(base | para), qw | {"q1.paraphrase": 0.0, "q2.paraphrase": 0.0})
    assert with_para["reward"].to_list() == without["reward"].to_list()  # bit for bit
    assert with_para["advantage"].to_list() == without["advantage"].to_list()
    assert rewards(_scores(base | para), qw)["reward"].to_list() == without["reward"].to_list()  # rank.py's way


def test_evidence_numbers_are_settled_so_a_resumed_proposal_writes_the_same_bytes():
    """Two means of the same numbers summed in another order differ in their last bits; evidence.json may not."""
    from rlme_pipeline.evolve.evidence import settled

    a, b = sum([0.1, 0.2, 0.3]) / 3, sum([0.3, 0.2, 0.1]) / 3
    assert a != b
    assert settled({"x": [a, {"y": a}], "n": 3, "s": "t"}) == settled({"x": [b, {"y": b}], "n": 3, "s": "t"})
    assert settled([float("nan")])[0] != settled([float("nan")])[0]  # NaN passes through untouched
