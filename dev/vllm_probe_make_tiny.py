"""Throwaway: write a tiny random Llama (float32, head_dim 64) + byte-level BPE tokenizer.

Usage: python dev/vllm_probe_make_tiny.py [OUT_DIR]   (default /tmp/tinyllm)
Needs transformers + tokenizers + torch (not vLLM). Downloads nothing.
Not the project's real builder; used only by the vllm_probe_* scripts.
"""

import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tinyllm"
VOCAB = 2048

CORPUS = [
    "Question: Is the answer correct? Answer: Yes",
    "Question: Is the answer correct? Answer: No",
    "The quick brown fox jumps over the lazy dog.",
    "A model writes an answer, then judges its own answer with Yes or No.",
    "Two plus two is four. Three times three is nine. Ten minus one is nine.",
] * 50 + [f"Number {i} plus {i + 1} equals {2 * i + 1}." for i in range(500)]


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    hf_tok.chat_template = (
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    # random init has std 0.02 -> nearly uniform next-token dist; widen logits a bit
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(OUT)
    hf_tok.save_pretrained(OUT)
    print("wrote", OUT, "tokenizer vocab", len(hf_tok), "yes/no ids", hf_tok.encode(" Yes"), hf_tok.encode(" No"))


if __name__ == "__main__":
    main()
