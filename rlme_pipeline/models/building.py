"""The one lock under which rlme builds every model.

transformers builds a model under process-global patches (`no_tie_weights` swaps PreTrainedModel.tie_weights,
`no_init_weights` the torch.nn.init functions) and puts back what it found: two threads building at once
(a flow's fanned-out re-score shards each load their judges) can put back each other's patch, and weight
tying then stays off for the process: a tied model (SmolLM2, Qwen2.5-0.5B) loads with a random lm_head.
Every model rlme builds (from_pretrained, from_config, peft) is built under this lock
(tests/unit/test_model_build_threads.py).
"""

import threading

BUILDING = threading.RLock()
