"""Tiny offline models: a random-weight Llama policy and evaluator with a locally trained tokenizer.

Tests and the demo must run without downloading anything, yet exercise the same
`from_pretrained` code path a real model uses. So we write two ordinary Hugging Face model
directories from scratch: a byte-level BPE tokenizer trained in-process on a small bundled
corpus (assets/corpus.txt), shared by both models, and two randomly initialised Llamas built
from different seeds and depths so the evaluator is genuinely "another model".

head_dim is kept at 64 because vLLM's CPU attention backend rejects small head sizes (16).
" Yes"/" No"/"Yes"/"No" must each be a single token: the meta-evaluation reward reads the
probability of one answer token.

Everything is deterministic in `seed`, so a cached copy and a fresh build are byte-identical.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus.txt"
VOCAB_SIZE = 2048
MAX_LEN = 1024
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SINGLE_TOKEN_WORDS = (" Yes", " No", "Yes", "No")

# The space after "Role:" is part of the template, so a generation prompt ending in
# "Assistant:" is continued with " The ..." exactly as a rendered assistant turn tokenizes.
# bos is in the template because chat text is tokenized without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Policy and evaluator differ in seed offset and depth; both keep head_dim = hidden / heads = 64.
MODELS = {
    "policy": dict(seed_offset=0, num_hidden_layers=2),
    "evaluator": dict(seed_offset=1000, num_hidden_layers=3),
}
ARCH = dict(
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=512,
    max_position_embeddings=MAX_LEN,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
_COMPLETE_MARKERS = ("config.json", "model.safetensors", "tokenizer.json")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the shared tokenizer on the bundled corpus (a pure function of the corpus)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    # Plain `encode(text)` gets a bos like a real Llama; chat text already has it from the template.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=MAX_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    for word in SINGLE_TOKEN_WORDS:
        ids = hf.encode(word, add_special_tokens=False)
        assert len(ids) == 1, f"{word!r} must be one token, got {ids}: extend the corpus"
    return hf


def build_model(tokenizer: PreTrainedTokenizerFast, name: str, seed: int) -> LlamaForCausalLM:
    spec = MODELS[name]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=spec["num_hidden_layers"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **ARCH,
    )
    torch.manual_seed(seed + spec["seed_offset"])
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@contextmanager
def _no_progress_bars():
    # save_pretrained draws a tqdm bar per shard, which is noise in test and pipeline logs.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in _COMPLETE_MARKERS)


def make_tiny(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/policy` and `out_dir/evaluator`; a no-op where both are already complete.

    Each model is built in a hidden temp dir inside `out_dir` and renamed into place, so a
    crash never leaves a directory that looks like a model but is half written, and two
    builders racing each other both end up with the (identical) winner's copy.
    """
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in MODELS}
    missing = [name for name, path in paths.items() if not _is_complete(path)]
    if not missing:
        return paths

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    build_root = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir))
    try:
        for name in missing:
            staged = build_root / name
            with _no_progress_bars():
                build_model(tokenizer, name, seed).save_pretrained(staged, safe_serialization=True)
            tokenizer.save_pretrained(staged)
            # transformers writes the weights through a 0600 temp file; a cache may be read by
            # another user (e.g. a vLLM server), so give it the same mode as the other files.
            os.chmod(staged / "model.safetensors", (staged / "config.json").stat().st_mode)
            try:
                # rename replaces an empty target dir atomically and fails on a non-empty one.
                os.rename(staged, paths[name])
            except OSError:
                if not _is_complete(paths[name]):
                    raise  # something else is in the way; don't paper over it
    finally:
        shutil.rmtree(build_root, ignore_errors=True)
    return paths


def cache_root() -> Path:
    return Path(os.environ.get("RLME_CACHE", Path.home() / ".cache" / "rlme"))


def resolve_tiny(name: str, seed: int = 0) -> Path:
    """Path of the cached tiny model `name` ("policy" or "evaluator"), built on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown tiny model {name!r}; valid names are: {', '.join(MODELS)}")
    return make_tiny(cache_root() / "tiny" / f"seed-{seed}", seed)[name]
