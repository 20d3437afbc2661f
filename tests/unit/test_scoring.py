"""Judgements read off the tiny evaluator, checked against plain full forward passes."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlme_pipeline.backends.hf import judge
from rlme_pipeline.config import ConfigError, QuestionConfig, ScoringConfig
from rlme_pipeline.judging.judges import Evaluator, answer_ids, score_rollouts
from rlme_pipeline.models.loading import weights_version
from rlme_pipeline.models.weights_at import ModelRef

QUESTIONS = [
    QuestionConfig(id="correct", text="Is the answer correct?"),
    QuestionConfig(id="logical", text="Does the whole solution logically lead from the question to an answer?"),
    QuestionConfig(
        id="len", text='Is it between 200 and 500 "characters" {long}? Ñ', positive=[" Yes"], negative=[" No"]
    ),
]
ROLLOUTS = pl.DataFrame(
    {
        "rollout_id": ["r1", "r2", "r3"],
        "iteration": [0, 0, 0],
        "prompt": ["What is 2+3?", "What is 11-5?", "Tell me a story about a very long road. " * 6],
        "completion": [" The answer is 5.", "6", " Let's solve this problem step by step."],
    }
)


@pytest.fixture
def evaluator(tiny_models):
    path = str(tiny_models["evaluator"])
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


def _direct(model, ids: list[int], yes: list[int], no: list[int]) -> tuple[float, float]:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    return torch.logsumexp(lp[yes], 0).item(), torch.logsumexp(lp[no], 0).item()


def _judge_text_ids(tok, sc: ScoringConfig, row: dict, q: QuestionConfig, chat: bool) -> list[int]:
    """The judge's input as a plain forward pass sees it: the raw template's two tokenisations joined, or
    the chat template's whole text (one user message, assistant turn opened) tokenised in one go."""
    body = sc.template.format(prompt=row["prompt"], completion=row["completion"])
    asked = sc.question_template.format(question=q.text)
    if not chat:
        return tok(body)["input_ids"] + tok(asked, add_special_tokens=False)["input_ids"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": body + asked}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def _reply_ids(tok, ids: list[int], answers: list[str]) -> list[int]:
    """The token each answer becomes as the first token of a reply after `ids`."""
    text = tok.decode(ids)
    return sorted({tok(text + a, add_special_tokens=False)["input_ids"][len(ids)] for a in answers})


@pytest.mark.parametrize(
    "mode, predates, chat",
    [("off", False, False), ("on", False, True), ("auto", False, True), ("auto", True, False)],
)
def test_scores_equal_a_direct_forward_pass(evaluator, backends, mode, predates, chat):
    """Every form the judge can read (the tiny tokenizer has a chat template: auto is on, except for a run
    made before scoring.chat_template existed) equals a plain forward pass over that text."""
    model, tok, path = evaluator
    sc = ScoringConfig(chat_template=mode)
    ref = ModelRef(path, weights_version(path), "float32", "cpu")
    scores = score_rollouts(ROLLOUTS, [Evaluator("ev", ref, predates)], QUESTIONS, sc, "train", backends)
    assert scores.height == 3 * 3 and (scores["status"] == "ok").all()
    for r in scores.iter_rows(named=True):
        row = ROLLOUTS.filter(pl.col("rollout_id") == r["rollout_id"]).row(0, named=True)
        q = next(q for q in QUESTIONS if q.id == r["question_id"])
        ids = _judge_text_ids(tok, sc, row, q, chat)
        if chat:
            yes, no = _reply_ids(tok, ids, q.positive), _reply_ids(tok, ids, q.negative)
        else:
            yes, no = answer_ids(tok, q.positive, "t"), answer_ids(tok, q.negative, "t")
        y, n = _direct(model, ids, yes, no)
        assert r["logp_yes"] == pytest.approx(y, abs=1e-5)
        assert r["logp_no"] == pytest.approx(n, abs=1e-5)
        assert r["p_yes"] == pytest.approx(1 / (1 + torch.tensor(n - y).exp().item()), abs=1e-6)
        assert r["question_sha"] == q.sha()


def test_shared_prefix_equals_scoring_each_question_alone(evaluator):
    model, tok, _ = evaluator
    prefixes = [tok(f"Question: what is {a}?\nResponse: {'blah ' * a}\n")["input_ids"] for a in (1, 7, 30)]
    questions = [
        tok(f"{t} Answer:", add_special_tokens=False)["input_ids"]
        for t in ("Is it right?", "Short?", "Is the whole solution logical and complete?")
    ]
    yes, no = answer_ids(tok, [" Yes", "Yes"], "t"), answer_ids(tok, [" No"], "t")
    together = judge(model, prefixes, questions, yes, no, tok.pad_token_id, 1024)
    for k, q in enumerate(questions):
        alone = judge(model, prefixes, [q], yes, no, tok.pad_token_id, 1024)
        for b in range(len(prefixes)):
            assert together[b][k].logp_yes == pytest.approx(alone[b][0].logp_yes, abs=1e-5)
            assert together[b][k].logp_no == pytest.approx(alone[b][0].logp_no, abs=1e-5)


def test_too_long_input_is_a_status_not_a_number(evaluator):
    model, tok, _ = evaluator
    prefixes = [[0, 5, 6], list(range(3, 1100))]
    res = judge(model, prefixes, [[7, 8]], [9], [10], tok.pad_token_id, 1024)
    assert res[0][0].status == "ok"
    assert res[1][0].status == "context_overflow" and res[1][0].logp_yes is None


def test_answer_variants_must_be_single_tokens(evaluator):
    _, tok, _ = evaluator
    assert len(answer_ids(tok, [" Yes", "Yes", " Yes"], "q")) == 2  # duplicates count once
    with pytest.raises(ConfigError, match=r"questions\[x\].positive: answer ' Absolutely yes' is \d+ tokens"):
        answer_ids(tok, [" Absolutely yes"], "questions[x].positive")
