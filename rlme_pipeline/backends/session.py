"""The backends one process holds open, and for how long: `Backends`.

    with Backends(cfg.vllm_settings()) as backends:
        with backends.generator(ref, "hf") as (gen, tok): ...

Lifetimes are the owner's: the runner opens one `Backends` for a training process and hands it to every
stage; a re-score or an audit opens its own; closing it stops every server it started. An hf model
comes from its model pool, so the stages of one process never reload a model between tasks. A managed
vLLM server (openai backend) is started for the stage on the stage's weights (iteration i generates with
checkpoint i-1, an ordinary HF directory), and stopped when the stage ends; with `vllm.keep_alive` it stays
up for the next stage that needs the same weights (one at a time), with `vllm.weight_sync` it stays up and
loads each checkpoint in place (docs/vllm.md).

A trainer's policy generator on the vllm backend is colocated with it: one in-process engine per
architecture, kept until the owner closes, never stopped to make room for a server. Each stage it holds
the weights the stage asks for: the trainer's tensors pushed from the pool (the model the update just
trained), else the checkpoint directory reloaded in place. Judges of that architecture share it; any
other in-process judge gets an engine of its own for the stage.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rlme_pipeline.backends import BackendConfigError, BackendError
from rlme_pipeline.config import VllmConfig
from rlme_pipeline.models import adapters
from rlme_pipeline.models.loading import ModelPool, load_tokenizer, master_dtype, weights_version
from rlme_pipeline.models.weights_at import ModelRef


def eos_ids(model, tok) -> set[int]:
    extra = getattr(model.generation_config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return {tok.eos_token_id, *extra}


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


def model_family(path: str) -> str:
    """What a server started on `path` can hold after a weight sync: its config.json (the architecture and
    shapes), without the fields that do not change them."""
    import hashlib

    if not (Path(path) / "config.json").exists():  # not a local directory: only itself
        return path
    cfg = json.loads((Path(path) / "config.json").read_text())
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _close(obj) -> None:
    if hasattr(obj, "stop"):
        obj.stop()
    else:  # an in-process LLM
        from rlme_pipeline.backends.vllm import shutdown

        shutdown(obj)


def _vllm_python(v: VllmConfig) -> str:
    py = v.python or os.environ.get("RLME_VLLM_PYTHON")
    if not py:
        raise BackendConfigError(
            "the openai backend without vllm.url starts a managed vLLM server and needs an interpreter "
            "with vllm: set vllm.python or RLME_VLLM_PYTHON (build one with `make vllm-venv`)"
        )
    return py


def _check_external(url: str, ref: ModelRef) -> None:
    """An external server serves one fixed model: refuse to use it for different weights."""
    import httpx

    try:
        served = [
            m.get("root") or m["id"] for m in httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"]
        ]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise BackendError(f"vllm.url {url}: cannot list its models ({e})") from None
    want = os.path.realpath(ref.path)
    if not any(s == ref.path or os.path.realpath(s) == want for s in served):
        raise BackendConfigError(
            f"vllm.url {url} serves {served}, but this stage needs {ref.path} (version {ref.version[:12]}); an external "
            "server cannot follow the policy's checkpoints: leave vllm.url unset to let the stage manage the server"
        )


# vLLM's accepted --max-lora-rank values (vllm/config/lora.py MaxLoRARanks, 0.32)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds rank-r adapters."""
    return next((x for x in LORA_RANKS if x >= r), r)


def _server_group(python: str, path: str, ref: ModelRef, v: VllmConfig):
    """vllm.replicas managed servers on `path`: on cuda each sees its own GPU slice (CUDA_VISIBLE_DEVICES),
    tensor parallel over vllm.tensor_parallel_size GPUs; able to sync weights in place when vllm.weight_sync
    is set, and to load LoRA adapters when the policy is LoRA (vllm.max_lora_rank)."""
    from rlme_pipeline.backends.server import ManagedServer, ServerGroup, replica_gpus

    tp = v.tensor_parallel_size
    args = [*v.server_args, *(["--tensor-parallel-size", str(tp)] if tp > 1 else [])]
    env = dict(v.env)
    if v.weight_sync:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /reset_prefix_cache (bound to 127.0.0.1)
    if v.max_lora_rank:
        args += ["--enable-lora", "--max-lora-rank", str(lora_rank(v.max_lora_rank))]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    envs = [dict(env) for _ in range(v.replicas)]
    if ref.device.startswith("cuda") and v.replicas > 1:
        for env, gpus in zip(envs, replica_gpus(v.replicas, tp, visible_gpus())):
            env["CUDA_VISIBLE_DEVICES"] = gpus
    return ServerGroup(
        [
            ManagedServer(
                python,
                path,
                dtype=ref.dtype,
                args=args,
                env=env,
                startup_timeout_s=v.startup_timeout_s,
                max_restarts=v.max_restarts,
            )
            for env in envs
        ]
    )


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class Backends:
    """The models and inference servers of one owner (a training process, a re-score, an audit).

    Shared by threads (re-score shards): the model pool is locked, an hf model and a managed server or an
    in-process LLM each serve one thread at a time (the next one reuses it when kept alive)."""

    def __init__(self, vllm: VllmConfig | None = None, pool_capacity: int = 4):
        self.vllm = vllm or VllmConfig()
        self.pool = ModelPool(pool_capacity)
        self.in_use: list[object] = []  # the servers/LLMs a stage is using right now (tests kill one mid-stage)
        self._live: dict[tuple, object] = {}  # keep_alive: the one live server/LLM, keyed by what it serves
        self._engines: dict[tuple, object] = {}  # the kept in-process engines (KeptEngine), by architecture
        self._serving = threading.RLock()
        # hf models are used one thread at a time: a LoRA run's base is one model whose adapter weights (or
        # adapters-off state) change with the checkpoint asked for, and re-score shards run in threads
        self._hf_turn = threading.RLock()
        self._start_watchers: list[list[float]] = []
        self._tokenizers: dict[str, object] = {}

    def __enter__(self) -> Backends:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every kept-alive server/LLM and kept engine, and drop the loaded models."""
        for key in list(self._live):
            _close(self._live.pop(key))
        for key in list(self._engines):
            _close(self._engines.pop(key).llm)
        self.pool.clear()

    @contextmanager
    def starts(self) -> Iterator[list[tuple[str, float]]]:
        """(kind, seconds) of every weight load inside the block, a stage's reload cost: "start" (a server
        or LLM started until healthy) or "sync" (new weights pushed into a running one)."""
        seen: list[tuple[str, float]] = []
        self._start_watchers.append(seen)
        try:
            yield seen
        finally:
            self._start_watchers.remove(seen)

    @contextmanager
    def generator(self, ref: ModelRef, backend: str = "hf", *, colocated: Callable[[], float] | None = None):
        """(generator, tokenizer) for the policy `ref`. colocated: given by a trainer for its policy, whose
        vllm engine is then kept for this owner's lifetime beside the trainer; it returns the share of a
        CUDA device that engine may take when it is built (vllm.gpu_memory_utilization overrides it). Other
        vllm generators (a proposer model) get an engine for the call, in its own processes."""
        if backend == "hf":
            from rlme_pipeline.backends.hf import HFGenerator

            with self._hf_turn:
                lm = adapters.load(self.pool, ref)
                yield HFGenerator(lm.model, eos_ids(lm.model, lm.tokenizer), lm.tokenizer.pad_token_id), lm.tokenizer
        elif backend == "openai":
            from rlme_pipeline.backends.openai import OpenAIGenerator

            with self._openai_client(ref) as client:
                yield OpenAIGenerator(client), self._tokenizer(ref.base or ref.path)
        elif backend == "vllm":
            from rlme_pipeline.backends.vllm import VLLMGenerator

            with self._kept_llm(ref, colocated) if colocated else self._llm(ref) as (llm, lora):
                yield VLLMGenerator(llm, lora), self._tokenizer(ref.base or ref.path)
        else:
            raise ValueError(f"unknown generation backend {backend!r}")

    @contextmanager
    def judge(self, ref: ModelRef, backend: str = "hf"):
        """(judge, tokenizer) for the evaluator `ref`."""
        if backend == "hf":
            from rlme_pipeline.backends.hf import HFJudge

            with self._hf_turn:
                lm = adapters.load(self.pool, ref)
                yield HFJudge(lm.model, lm.tokenizer.pad_token_id), lm.tokenizer
        elif backend == "openai":
            from rlme_pipeline.backends.openai import OpenAIJudge

            with self._openai_client(ref) as client:
                path = ref.base or ref.path
                yield OpenAIJudge(client, max_positions_of(path)), self._tokenizer(path)
        elif backend == "vllm":
            from rlme_pipeline.backends.vllm import VLLMJudge

            kept = self._engine_key(ref) in self._engines  # the policy's architecture: its engine judges
            with self._kept_llm(ref) if kept else self._llm(ref) as (llm, lora):
                yield VLLMJudge(llm, lora), self._tokenizer(ref.base or ref.path)
        else:
            raise ValueError(f"unknown scoring backend {backend!r}")

    def _tokenizer(self, path: str):
        """The tokenizer of a served model (checkpoint paths are attempt-unique: a path names one model)."""
        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(path)
        return self._tokenizers[path]

    @contextmanager
    def _resource(self, key: tuple, make, keep: bool = False):
        """A started server/LLM for the stage: reused from keep_alive, else made, and stopped after unless kept."""
        with self._serving:
            obj = self._live.pop(key, None)
            if obj is not None and hasattr(obj, "alive") and not obj.alive():
                obj.stop()
                obj = None
            for other in list(self._live):  # one at a time: a different model's server/LLM goes first (memory)
                _close(self._live.pop(other))
            obj = obj or make()
            self.in_use.append(obj)
            try:
                yield obj
            except BaseException:
                _close(obj)
                raise
            finally:
                self.in_use.remove(obj)
            if self.vllm.keep_alive or keep:
                self._live[key] = obj
            else:
                _close(obj)

    def _started(self, seconds: float, kind: str = "start") -> None:
        for seen in self._start_watchers:
            seen.append((kind, seconds))

    @contextmanager
    def _openai_client(self, ref: ModelRef):
        from rlme_pipeline.backends.openai import Client

        v = self.vllm
        common = dict(
            max_concurrency=v.max_concurrency, timeout_s=v.timeout_s, retries=v.retries, backoff_s=v.backoff_s
        )
        if urls := v.external_urls():
            for url in urls:
                _check_external(url, ref)
            yield Client(url=urls, **common)
            return
        python = _vllm_python(v)
        weights = ref.base or ref.path  # the full weights a server holds; a LoRA ref adds its adapter
        sync = self._syncs(ref)
        # a syncing server is keyed by the architecture it can hold, not by the weights in it
        key = ("server", python, model_family(weights) if sync else (ref.path, ref.version), ref.dtype)
        key += (tuple(v.server_args), v.replicas, v.tensor_parallel_size, tuple(sorted(v.env.items())))

        def make():
            group = _server_group(python, serving_dir(weights), ref, v)
            group.start()
            for srv in group.servers:
                self._started(srv.startup_seconds[-1])
            return group

        with self._resource(key, make, keep=sync) as group:
            for srv in group.servers:
                srv.restarts = 0  # the restart budget is per stage
            if sync:
                self._sync(group, ref, weights)
            yield Client(server=group.servers, model=ref.version if ref.base else None, **common)

    def _syncs(self, ref: ModelRef) -> bool:
        """Whether `ref` goes into a long-lived engine by sync rather than a start: with vllm.weight_sync,
        and in a LoRA run (max_lora_rank set: the base and every adapter share one engine)."""
        return self.vllm.weight_sync or self.vllm.max_lora_rank > 0 or ref.base is not None

    def _sync(self, group, ref: ModelRef, weights: str) -> None:
        """Push the stage's weights into running servers: full weights in place, then a LoRA ref's adapter
        (named by its content hash). The seconds are the stage's weight_sync_seconds."""
        t0 = time.perf_counter()
        synced = False
        for srv in group.servers:
            synced |= srv.sync_weights(serving_dir(weights))
            if ref.base is not None:
                synced |= srv.load_adapter(ref.version, serving_dir(ref.path))
        if synced:
            self._started(time.perf_counter() - t0, "sync")

    @contextmanager
    def _llm(self, ref: ModelRef):
        """(llm, lora_request or None) for `ref`, synced like a managed server (_openai_client)."""
        from rlme_pipeline.backends.vllm import adapter, load_llm, sync_weights

        v = self.vllm
        weights = ref.base or ref.path
        sync = self._syncs(ref)
        key = ("llm", model_family(weights) if sync else (ref.path, ref.version), ref.dtype)
        kw = {"tensor_parallel_size": v.tensor_parallel_size} if v.tensor_parallel_size > 1 else {}
        if v.max_lora_rank:
            kw.update(enable_lora=True, max_lora_rank=lora_rank(v.max_lora_rank))
        kw.update(v.engine_kwargs)
        with self._resource(key, lambda: load_llm(serving_dir(weights), ref.dtype, **kw), keep=sync) as llm:
            t0 = time.perf_counter()
            synced = sync and sync_weights(llm, serving_dir(weights))
            lora = None
            if ref.base is not None:
                synced |= ref.version not in llm.__dict__.get("rlme_adapter_ids", {})
                lora = adapter(llm, ref.version, serving_dir(ref.path))
            if synced:
                self._started(time.perf_counter() - t0, "sync")
            yield llm, lora

    # --- the kept, colocated engine (vllm backend) ---------------------------------------------------------
    @staticmethod
    def _engine_key(ref: ModelRef) -> tuple:
        return (model_family(ref.base or ref.path), ref.dtype, ref.device)

    @staticmethod
    def _weights_name(ref: ModelRef) -> str:
        """What a kept engine holds for `ref`: its content hash, or for a LoRA ref its base's (the adapter
        comes apart), which is the initial policy's version: no reload between iteration 0 and 1."""
        return ref.version if ref.base is None else weights_version(ref.base)

    @contextmanager
    def _kept_llm(self, ref: ModelRef, share: Callable[[], float] | None = None):
        """(llm, lora_request or None) from the kept engine of `ref`'s architecture (built on first use: a
        "start"), holding `ref`'s weights (loading them is a "sync": weight_sync_seconds). A stage that
        fails takes the engine with it: the next one builds a fresh engine rather than trust a half load."""
        from rlme_pipeline.backends.vllm import adapter

        key, weights = self._engine_key(ref), ref.base or ref.path
        with self._serving:
            engine = self._engines.get(key) or self._build_engine(key, ref, share)
            self.in_use.append(engine.llm)
            try:
                t0 = time.perf_counter()
                with engine.serving(self._weights_name(ref), serving_dir(weights), self._trained(ref)) as seconds:
                    synced = seconds is not None
                    lora = None
                    if ref.base is not None:
                        synced |= ref.version not in engine.llm.__dict__.get("rlme_adapter_ids", {})
                        lora = adapter(engine.llm, ref.version, serving_dir(ref.path))
                    if synced:
                        self._started(time.perf_counter() - t0, "sync")
                    yield engine.llm, lora
            except BaseException:
                _close(self._engines.pop(key).llm)
                raise
            finally:
                self.in_use.remove(engine.llm)

    def _build_engine(self, key: tuple, ref: ModelRef, share_of: Callable[[], float] | None):
        """An in-process engine on `ref`'s weights; on a CUDA device sized to what the trainer leaves."""
        from rlme_pipeline.backends.vllm import KeptEngine, load_llm

        v, kw = self.vllm, {}
        if v.tensor_parallel_size > 1:
            kw["tensor_parallel_size"] = v.tensor_parallel_size
        if v.max_lora_rank:
            kw.update(enable_lora=True, max_lora_rank=lora_rank(v.max_lora_rank))
        share = v.gpu_memory_utilization
        if share is None and "gpu_memory_utilization" not in v.engine_kwargs and ref.device.startswith("cuda"):
            share = share_of() if share_of is not None else None
        if share is not None:
            kw["gpu_memory_utilization"] = share
        kw.update(v.engine_kwargs)
        # no sleep with LoRA: a level-2 sleep discards the loaded adapters' weights with the base's
        sleep = v.sleep and not v.max_lora_rank
        t0 = time.perf_counter()
        llm = load_llm(serving_dir(ref.base or ref.path), ref.dtype, colocate=True, sleep=sleep, **kw)
        self._started(time.perf_counter() - t0)
        self._engines[key] = KeptEngine(llm, self._weights_name(ref))
        return self._engines[key]

    def _trained(self, ref: ModelRef) -> Callable[[], object] | None:
        """The weights of `ref` as tensors this process holds (the pool keeps the model the update just
        trained, Runner._keep_trained), so the engine gets them without reading the checkpoint back; None
        when no pooled model has that content hash (a fresh process, a LoRA ref, an FSDP update), or when
        the engine's workers run in other processes (tensor parallel): then its directory is reloaded."""
        if ref.base is not None or self.vllm.tensor_parallel_size > 1:
            return None
        for dtype in dict.fromkeys((master_dtype(ref.dtype), ref.dtype)):
            lm = self.pool.peek(ref.path, dtype, ref.device)
            if lm is not None and lm.version == ref.version:
                return lambda model=lm.model: model.state_dict().items()
        return None
