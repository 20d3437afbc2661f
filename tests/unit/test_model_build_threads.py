"""Models built from several threads at once (a Prefect flow's fanned-out re-score shards each load their
judges) must come out as one thread alone builds them.

transformers builds a model under process-global patches (`no_tie_weights` swaps PreTrainedModel.tie_weights,
`no_init_weights` the torch.nn.init functions) and restores what it found on the way out: two threads
building at once can restore each other's patch, and weight tying then stays off for the whole process.
A tied model (SmolLM2, Qwen2.5-0.5B) loaded after that has a random lm_head: its judgements are noise.
"""

from __future__ import annotations

import threading

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlme_pipeline.jobs import memory
from rlme_pipeline.models.loading import ModelPool

TIED = Qwen2Config(
    vocab_size=128,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def _tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def test_loads_from_many_threads_leave_weight_tying_on(tmp_path):
    path = tmp_path / "tied"
    Qwen2ForCausalLM(TIED).save_pretrained(path)
    pool, loaded, errors = ModelPool(capacity=1), [], []

    def load() -> None:
        try:
            for _ in range(5):
                loaded.append(pool.take(str(path)).model)  # take: a load of its own each time
                memory.shape_of(str(path))  # builds on the meta device: the same patches
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(loaded) == 40
    assert all(_tied(m) for m in loaded)
    # and the process still ties: what any later load in it gets
    assert _tied(pool.take(str(path)).model)
    with torch.device("meta"):
        assert _tied(AutoModelForCausalLM.from_config(TIED))
