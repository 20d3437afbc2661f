"""What an evaluator reads (judging/inputs.py): its chat template, with the real SmolLM2-135M-Instruct
tokenizer, the K questions still packed on one shared prefix, and runs made before scoring.chat_template
keeping their hash and their scores."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from rlme_pipeline.config import ConfigError, QuestionConfig, ScoringConfig, load_config
from rlme_pipeline.judging import inputs
from rlme_pipeline.judging.judges import Evaluator, evaluators_at, judge_answer_ids, score_rollouts
from rlme_pipeline.models.loading import weights_version
from rlme_pipeline.models.weights_at import ModelRef
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store
from tests.conftest import DEMO


# --- the real SmolLM2 tokenizer ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    """SmolLM2-135M-Instruct's tokenizer (vocab 49,152, ChatML template), from the imported HF directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def smollm2_shaped(smollm2_tok, tmp_path_factory) -> str:
    """A small random Llama over SmolLM2's vocabulary, saved with its tokenizer: the packed forward pass
    against the plain one needs real token ids, not real weights (the 135M model takes ~40 s to load)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tok
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("smollm2-shaped")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


QUESTIONS = [
    QuestionConfig(id="correct", text="Is the answer correct?"),
    QuestionConfig(id="logic", text="\nDoes the solution follow logically?"),  # starts at the seam with "\n"
    QuestionConfig(id="short", text="Is it short?", positive=["Yes", "yes"], negative=["No", "no"]),
]
ROLLOUTS = pl.DataFrame(
    {
        "rollout_id": ["plain", "newline", "two", "space", "unicode"],
        "iteration": [0] * 5,
        "prompt": ["What is 2+3?", "What is 11-5?", "What is 7+8?", "Name a colour.", "Traduis « oui »."],
        # completions that end in whitespace put a byte-level BPE seam where the question starts
        "completion": [" The answer is 5.", "6\n", "The answer is 15.\n\n", "Blue ", "« yes » — 是"],
    }
)


def _whole(tok, sc: ScoringConfig, row: dict, q: QuestionConfig) -> list[int]:
    body = sc.template.format(prompt=row["prompt"], completion=row["completion"])
    asked = sc.question_template.format(question=q.text)
    text = tok.apply_chat_template(
        [{"role": "user", "content": body + asked}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def test_smollm2_answers_are_read_where_its_reply_starts(smollm2_tok):
    """After `<|im_start|>assistant\\n` a ChatML reply starts with "Yes" (no space): each variant's id is the
    token a templated reply begins with, and one that is not a single token there is refused, by field."""
    tok, sc = smollm2_tok, ScoringConfig(chat_template="on")
    q = QuestionConfig(id="correct", text="Is the answer correct?", positive=[" Yes", "Yes", "yes"])
    yes, no = judge_answer_ids(tok, q, sc, chat=True)
    prompt = _whole(tok, sc, {"prompt": "What is 2+3?", "completion": "5"}, q)
    assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    for reply, ids in (("Yes, it is.", yes), ("yes", yes), ("No.", no)):
        full = tok(tok.decode(prompt) + reply, add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt and full[len(prompt)] in ids, reply
    assert len(yes) == 3 and len(no) == 2  # " Yes", "Yes", "yes" are three distinct single tokens
    bad = q.model_copy(update={"positive": ["YES"]})
    with pytest.raises(
        ConfigError, match=r"questions\[correct\]\.positive: answer 'YES' is 2 tokens .* assistant header"
    ):
        judge_answer_ids(tok, bad, sc, chat=True)
    merging = q.model_copy(update={"negative": ["\n"]})  # "\n" after the header's "\n" is the one token "\n\n"
    with pytest.raises(ConfigError, match=r"questions\[correct\]\.negative: answer '\\n' merges with the end"):
        judge_answer_ids(tok, merging, sc, chat=True)


def test_smollm2_shared_prefix_is_a_token_prefix_of_every_whole_text(smollm2_tok):
    """prefix + suffix is the whole text's own tokenisation for every rollout and question, including
    completions that end in whitespace, where tokenising the two halves apart gives other tokens."""
    tok, sc = smollm2_tok, ScoringConfig(chat_template="on")
    texts = ROLLOUTS.to_dicts()
    enc = inputs.encode(tok, texts, [q.text for q in QUESTIONS], sc, chat=True)
    seams = 0
    for i, row in enumerate(texts):
        body = sc.template.format(prompt=row["prompt"], completion=row["completion"])
        head = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False)
        head = head[: head.find(body) + len(body)]
        apart = tok(head, add_special_tokens=False)["input_ids"]
        seams += enc.prefixes[i] != apart  # the seam moved the shared prefix back
        for k, q in enumerate(QUESTIONS):
            assert enc.prefixes[i] + enc.suffixes[i][k] == _whole(tok, sc, row, q), (row["rollout_id"], q.id)
    assert seams >= 2, "no rollout crossed a tokenisation seam: the test would not catch a split that ignores it"


def test_smollm2_packed_chat_judgements_equal_direct_forward_passes(smollm2_shaped, backends):
    """Scores through the pipeline (chat template, K questions packed on the shared prefix, rollouts
    grouped by their suffixes) equal a plain forward pass over each whole templated text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_shaped).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_shaped)
    sc = ScoringConfig(chat_template="auto", batch_size=4)  # auto: SmolLM2 has a chat template
    ref = ModelRef(smollm2_shaped, weights_version(smollm2_shaped), "float32", "cpu")
    scores = score_rollouts(ROLLOUTS, [Evaluator("smol", ref)], QUESTIONS, sc, "train", backends)
    assert scores.height == ROLLOUTS.height * len(QUESTIONS) and (scores["status"] == "ok").all()
    for r in scores.iter_rows(named=True):
        row = ROLLOUTS.filter(pl.col("rollout_id") == r["rollout_id"]).row(0, named=True)
        q = next(q for q in QUESTIONS if q.id == r["question_id"])
        ids = _whole(tok, sc, row, q)
        yes, no = judge_answer_ids(tok, q, sc, chat=True)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        assert r["logp_yes"] == pytest.approx(torch.logsumexp(lp[yes], 0).item(), abs=1e-5), (row, q.id)
        assert r["logp_no"] == pytest.approx(torch.logsumexp(lp[no], 0).item(), abs=1e-5), (row, q.id)


def test_smollm2_openai_backend_sends_the_same_ids_and_gets_the_same_scores(smollm2_shaped, backends):
    """The openai backend (token-id prompts over HTTP) against a server that answers with a plain forward
    pass of the ids it receives: the prompts are the whole templated texts' own tokenisations, and the
    scores equal the hf backend's."""
    from contextlib import contextmanager

    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlme_pipeline.backends.openai import Client, OpenAIJudge

    model = AutoModelForCausalLM.from_pretrained(smollm2_shaped).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_shaped)
    received = []

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        received.extend(body["prompt"])
        choices = []
        for i, ids in enumerate(body["prompt"]):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            top = {f"token_id:{t}": float(lp[t]) for t in body["logprob_token_ids"]}
            choices.append({"index": i, "logprobs": {"top_logprobs": [top]}})
        return httpx.Response(200, json={"choices": choices})

    class OverHTTP:  # what Backends.judge(ref, "openai") yields, with the server above
        @contextmanager
        def judge(self, ref, backend):
            yield OpenAIJudge(Client(url="http://vllm", transport=httpx.MockTransport(server)), 2048), tok

    sc = ScoringConfig(chat_template="on", batch_size=4)
    ref = ModelRef(smollm2_shaped, weights_version(smollm2_shaped), "float32", "cpu")
    hf = score_rollouts(ROLLOUTS, [Evaluator("smol", ref)], QUESTIONS, sc, "train", backends)
    http = score_rollouts(ROLLOUTS, [Evaluator("smol", ref)], QUESTIONS, sc, "train", OverHTTP())
    wholes = [_whole(tok, sc, row, q) for row in ROLLOUTS.to_dicts() for q in QUESTIONS]
    assert sorted(received) == sorted(wholes)
    key = ["rollout_id", "question_id"]
    both = hf.join(http, on=key, suffix="_http")
    assert both.height == hf.height == http.height
    assert (both["logp_yes"] - both["logp_yes_http"]).abs().max() < 1e-5
    assert (both["logp_no"] - both["logp_no_http"]).abs().max() < 1e-5


def test_on_without_a_chat_template_names_the_field(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["evaluator"]))
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"scoring.chat_template: on, but evaluator 'judge' has no chat template"):
        inputs.uses_chat(ScoringConfig(chat_template="on"), tok, "judge")
    assert not inputs.uses_chat(ScoringConfig(), tok, "judge")  # auto: the raw text


def test_a_run_made_before_chat_template_keeps_its_hash_and_its_raw_scores(tiny_models, tmp_path, backends):
    """A run whose run.json predates scoring.chat_template: the same config resumes it (same hash), and
    its evaluators still read the raw text under the default "auto"; a new run reads the chat form."""
    cfg = load_config(DEMO).with_overrides(storage=str(tmp_path / "runs"), iterations=1)
    old, new = Run(Store(cfg.run.storage), "old"), Run(Store(cfg.run.storage), "new")
    for run in (old, new):
        run.open(cfg.with_overrides(id=run.id))
    meta = old.store.read_json("run.json")
    del meta["config"]["scoring"]["chat_template"]  # as an older rlme wrote it
    old.store.write_json("run.json", meta)
    assert old.check(cfg.with_overrides(id="old")) and old.config().hash() == meta["config_hash"]

    rollouts = ROLLOUTS.head(3)
    qs = list(cfg.questions)
    was = score_rollouts(rollouts, evaluators_at(old, cfg, 0)[:1], qs, cfg.scoring, "train", backends)
    now = score_rollouts(rollouts, evaluators_at(new, cfg, 0)[:1], qs, cfg.scoring, "train", backends)
    ref = evaluators_at(new, cfg, 0)[0].ref
    raw = score_rollouts(rollouts, [Evaluator("other", ref)], qs, ScoringConfig(chat_template="off"), "train", backends)
    chat = score_rollouts(rollouts, [Evaluator("other", ref)], qs, ScoringConfig(chat_template="on"), "train", backends)
    assert was["logp_yes"].to_list() == raw["logp_yes"].to_list()
    assert now["logp_yes"].to_list() == chat["logp_yes"].to_list() != raw["logp_yes"].to_list()


def test_a_score_set_planned_before_chat_template_keeps_its_definition_hash():
    """`rlme rescore --resume` of a score set planned by an older rlme: its DEFINITION.json has no
    scoring.chat_template, and reading it back must give the hash it was written with."""
    from rlme_pipeline.config import sha256_json
    from rlme_pipeline.scoreset import Definition

    d = {
        "name": "v2",
        "run_id": "demo",
        "questions": [QuestionConfig(id="q", text="Is it right?").model_dump(mode="json")],
        "evaluators": [{"name": "other", "model": "tiny:evaluator"}],
        "scoring": {k: v for k, v in ScoringConfig().model_dump(mode="json").items() if k != "chat_template"},
        "scale_advantage_std": False,
        "iterations": [0],
        "sources": {},
        "evaluator_versions": {},
        "n_shards": {"0": 1},
        "shard_rows": 256,
    }
    written = Definition.model_validate(d)
    as_before = written.model_dump(mode="json")  # Definition.hash as it was: None-valued later fields left out
    del as_before["label_reward"], as_before["phase_questions"]
    as_before["scoring"].pop("chat_template")
    assert written.hash() == sha256_json(as_before)
    assert Definition.model_validate({**d, "scoring": {**d["scoring"], "chat_template": "on"}}).hash() != written.hash()


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_a_hand_written_chat_template_is_not_wrapped_twice(smollm2_tok, mode):
    """Templates already in ChatML, read in chat form, would put a chat inside the judge's user turn: one
    line naming both fields and the way out, and `off` keeps the hand-written text as it is."""
    hand = dict(
        template="<|im_start|>user\nQuestion: {prompt}\nResponse: {completion}\n\n",
        question_template="{question} Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n",
    )
    with pytest.raises(ConfigError, match=r"scoring.chat_template: .*already hold its markers \(<\|im_start\|>.*off"):
        inputs.uses_chat(ScoringConfig(chat_template=mode, **hand), smollm2_tok, "judge")
    assert not inputs.uses_chat(ScoringConfig(chat_template="off", **hand), smollm2_tok, "judge")
    assert inputs.uses_chat(ScoringConfig(chat_template=mode), smollm2_tok, "judge")
