"""Open the configured backend for a stage: `with open_generator(cfg.vllm, ref, backend) as (gen, tok): ...`.

Lifetimes: an hf model comes from the process's model pool. A managed vLLM server (openai backend) or an
in-process vllm.LLM is started for the stage on the stage's weights (iteration i generates with
checkpoint i-1, an ordinary HF directory), and stopped when the stage ends; with `vllm.keep_alive` it
stays up for the next stage that needs the same weights (one at a time). This restart per new checkpoint
is how policy updates reach the generator (docs/vllm.md: its cost, and LoRA hot-loading for 7B+ models).
"""

from __future__ import annotations

import atexit
import json
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from rlme_pipeline.backends import BackendError
from rlme_pipeline.config import VllmConfig
from rlme_pipeline.lineage import ModelRef
from rlme_pipeline.models import POOL, load_tokenizer

# keep_alive: the one live managed server / LLM, keyed by what it serves
_LIVE: dict[tuple, object] = {}
# every server start (seconds to healthy) in this process: the reload cost, reported as a stage metric
START_SECONDS: list[float] = []
# the servers/LLMs a stage is using right now (tests kill one mid-stage)
IN_USE: list[object] = []


def eos_ids(model, tok) -> set[int]:
    extra = getattr(model.generation_config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return {tok.eos_token_id, *extra}


@lru_cache(maxsize=8)
def tokenizer_for(path: str):
    return load_tokenizer(path)


def max_positions_of(path: str) -> int:
    try:
        return int(json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings", 1 << 30))
    except (OSError, ValueError):
        return 1 << 30


# What vLLM must not see in a checkpoint directory: it loads every *.safetensors it finds as weights, and
# the trainer's rng.safetensors is not.
TRAINER_FILES = {"rng.safetensors", "optimizer.pt", "trainer_state.json"}


def serving_dir(path: str) -> str:
    """`path` itself, or for a training checkpoint a directory of links to its model files only."""
    p = Path(path)
    if not p.is_dir() or not any((p / f).exists() for f in TRAINER_FILES):
        return path
    import hashlib
    import tempfile

    view = Path(tempfile.gettempdir()) / f"rlme-vllm-view-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:16]}"
    view.mkdir(exist_ok=True)
    for f in p.iterdir():
        link = view / f.name
        if f.name not in TRAINER_FILES and not link.exists():
            try:
                link.symlink_to(f.resolve())
            except FileExistsError:  # another process made the same view
                pass
    return str(view)


def close_all() -> None:
    for key in list(_LIVE):
        _close(_LIVE.pop(key))


atexit.register(close_all)


def _close(obj) -> None:
    if hasattr(obj, "stop"):
        obj.stop()
    else:  # an in-process LLM: stop its engine processes, then drop it
        import gc

        core = getattr(getattr(obj, "llm_engine", None), "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the LLM is dropped either way
            pass
        del obj
        gc.collect()


def _vllm_python(v: VllmConfig) -> str:
    py = v.python or os.environ.get("RLME_VLLM_PYTHON")
    if not py:
        raise BackendError("the openai backend without vllm.url starts a managed vLLM server and needs an interpreter "
                           "with vllm: set vllm.python or RLME_VLLM_PYTHON (build one with `make vllm-venv`)")
    return py


@contextmanager
def _resource(v: VllmConfig, key: tuple, make):
    """A started server/LLM for the stage: reused from keep_alive, else made, and stopped after unless kept."""
    if key in _LIVE:
        obj = _LIVE.pop(key)
        if hasattr(obj, "alive") and not obj.alive():
            obj.stop()
            obj = None
    else:
        obj = None
    close_all()  # one at a time: a different model's server/LLM goes first (memory)
    obj = obj or make()
    IN_USE.append(obj)
    try:
        yield obj
    except BaseException:
        _close(obj)
        raise
    finally:
        IN_USE.remove(obj)
    if v.keep_alive:
        _LIVE[key] = obj
    else:
        _close(obj)


def _check_external(url: str, ref: ModelRef) -> None:
    """An external server serves one fixed model: refuse to use it for different weights."""
    import httpx

    try:
        served = [m.get("root") or m["id"] for m in httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"]]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise BackendError(f"vllm.url {url}: cannot list its models ({e})") from None
    want = os.path.realpath(ref.path)
    if not any(s == ref.path or os.path.realpath(s) == want for s in served):
        raise BackendError(
            f"vllm.url {url} serves {served}, but this stage needs {ref.path} (version {ref.version[:12]}); an external "
            "server cannot follow the policy's checkpoints: leave vllm.url unset to let the stage manage the server")


@contextmanager
def _openai_client(v: VllmConfig, ref: ModelRef):
    from rlme_pipeline.backends.openai import Client
    from rlme_pipeline.backends.server import ManagedServer

    common = dict(max_concurrency=v.max_concurrency, timeout_s=v.timeout_s, retries=v.retries, backoff_s=v.backoff_s)
    if v.url:
        _check_external(v.url, ref)
        yield Client(url=v.url, **common)
        return
    python = _vllm_python(v)
    key = ("server", python, ref.path, ref.version, ref.dtype, tuple(v.server_args))

    def make():
        srv = ManagedServer(python, serving_dir(ref.path), dtype=ref.dtype, args=v.server_args, env=v.env,
                            startup_timeout_s=v.startup_timeout_s, max_restarts=v.max_restarts)
        srv.start()
        START_SECONDS.append(srv.startup_seconds[-1])
        return srv

    with _resource(v, key, make) as srv:
        srv.restarts = 0  # the restart budget is per stage
        yield Client(server=srv, **common)


@contextmanager
def _llm(v: VllmConfig, ref: ModelRef):
    from rlme_pipeline.backends.vllm import load_llm

    key = ("llm", ref.path, ref.version, ref.dtype)
    with _resource(v, key, lambda: load_llm(serving_dir(ref.path), ref.dtype, **v.engine_kwargs)) as llm:
        yield llm


@contextmanager
def open_generator(v: VllmConfig, ref: ModelRef, backend: str = "hf"):
    """(generator, tokenizer) for the policy `ref`."""
    if backend == "hf":
        from rlme_pipeline.backends.hf import HFGenerator

        lm = POOL.get(ref.path, ref.dtype, ref.device, ref.version)
        yield HFGenerator(lm.model, eos_ids(lm.model, lm.tokenizer), lm.tokenizer.pad_token_id), lm.tokenizer
    elif backend == "openai":
        from rlme_pipeline.backends.openai import OpenAIGenerator

        with _openai_client(v, ref) as client:
            yield OpenAIGenerator(client), tokenizer_for(ref.path)
    elif backend == "vllm":
        from rlme_pipeline.backends.vllm import VLLMGenerator

        with _llm(v, ref) as llm:
            yield VLLMGenerator(llm), tokenizer_for(ref.path)
    else:
        raise ValueError(f"unknown generation backend {backend!r}")


@contextmanager
def open_judge(v: VllmConfig, ref: ModelRef, backend: str = "hf"):
    """(judge, tokenizer) for the evaluator `ref`."""
    if backend == "hf":
        from rlme_pipeline.backends.hf import HFJudge

        lm = POOL.get(ref.path, ref.dtype, ref.device, ref.version)
        yield HFJudge(lm.model, lm.tokenizer.pad_token_id), lm.tokenizer
    elif backend == "openai":
        from rlme_pipeline.backends.openai import OpenAIJudge

        with _openai_client(v, ref) as client:
            yield OpenAIJudge(client, max_positions_of(ref.path)), tokenizer_for(ref.path)
    elif backend == "vllm":
        from rlme_pipeline.backends.vllm import VLLMJudge

        with _llm(v, ref) as llm:
            yield VLLMJudge(llm), tokenizer_for(ref.path)
    else:
        raise ValueError(f"unknown scoring backend {backend!r}")
