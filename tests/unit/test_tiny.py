"""The offline tiny models must be reproducible, loadable like real models, and cached."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlme_pipeline.models.tiny import make_tiny, resolve_tiny

FILES = ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "models", seed=0)


def test_paths_and_no_leftovers(tiny):
    assert set(tiny) == {"policy", "evaluator"}
    root = tiny["policy"].parent
    assert sorted(p.name for p in root.iterdir()) == ["evaluator", "policy"]  # temp dir cleaned up


def test_same_seed_is_byte_identical_other_seed_differs(tiny, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    for name in ("policy", "evaluator"):
        for f in FILES:
            assert (tiny[name] / f).read_bytes() == (again[name] / f).read_bytes(), (name, f)
        assert (tiny[name] / "model.safetensors").read_bytes() != (other[name] / "model.safetensors").read_bytes()
        # the tokenizer depends only on the corpus, not the seed
        assert (tiny[name] / "tokenizer.json").read_bytes() == (other[name] / "tokenizer.json").read_bytes()
    policy_w = (tiny["policy"] / "model.safetensors").read_bytes()
    assert policy_w != (tiny["evaluator"] / "model.safetensors").read_bytes()


def test_yes_no_are_single_tokens(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["evaluator"])
    ids = {w: tok.encode(w, add_special_tokens=False) for w in (" Yes", " No", "Yes", "No")}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == 4
    # in context too, the way a judge prompt ends
    tail = tok.encode("Is the answer correct? Yes", add_special_tokens=False)[-1:]
    assert tail == ids[" Yes"]


def test_tokenizer_special_tokens_and_roundtrip(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["policy"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left" and tok.model_max_length == 1024
    assert 1500 <= len(tok) <= 2048
    text = "What is 12+7? The answer is 19. Unseen wörds ✓ too."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["policy"])
    messages = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt == "<|bos|>User: What is 2+3?<|eos|>\nAssistant:"
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "The answer is 5."}], tokenize=False)
    assert full.startswith(prompt) and full.endswith("The answer is 5.<|eos|>\n")


def test_models_load_and_forward(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["policy"])
    for name, layers in (("policy", 2), ("evaluator", 3)):
        model = AutoModelForCausalLM.from_pretrained(tiny[name])
        cfg = model.config
        assert cfg.hidden_size // cfg.num_attention_heads == cfg.head_dim == 64
        assert cfg.num_hidden_layers == layers and cfg.vocab_size == len(tok)
        assert model.dtype == torch.float32
        assert model.generation_config.eos_token_id == tok.eos_token_id
        assert model.generation_config.pad_token_id == tok.pad_token_id
        batch = tok(["What is 2+3? The answer is"], return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (1, batch.input_ids.shape[1], len(tok))
        assert torch.isfinite(logits).all()


def test_make_tiny_is_a_noop_when_complete(tiny):
    before = {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in tiny.items()}
    again = make_tiny(tiny["policy"].parent, seed=0)
    assert again == tiny
    assert {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in again.items()} == before


def test_make_tiny_fills_in_a_missing_model(tmp_path):
    paths = make_tiny(tmp_path / "m")
    first = (paths["policy"] / "model.safetensors").read_bytes()
    mtime = (paths["evaluator"] / "model.safetensors").stat().st_mtime_ns
    for f in paths["policy"].iterdir():
        f.unlink()  # an empty dir, as if a build was interrupted before its rename
    make_tiny(tmp_path / "m")
    assert (paths["policy"] / "model.safetensors").read_bytes() == first
    assert (paths["evaluator"] / "model.safetensors").stat().st_mtime_ns == mtime


def test_resolve_tiny_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLME_CACHE", str(tmp_path / "cache"))
    path = resolve_tiny("policy")
    assert path == tmp_path / "cache" / "tiny" / "seed-0" / "policy"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_tiny("policy") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_tiny("evaluator") == path.parent / "evaluator"
    assert resolve_tiny("policy", seed=3) == tmp_path / "cache" / "tiny" / "seed-3" / "policy"


def test_resolve_tiny_rejects_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("RLME_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="policy.*evaluator"):
        resolve_tiny("judge")
    assert not (tmp_path / "cache").exists()
