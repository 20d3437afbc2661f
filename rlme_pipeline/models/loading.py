"""Model references, loading, content versions, and a small model pool.

A reference is 'tiny:policy' / 'tiny:evaluator' (built offline on first use), 'gguf:PATH' (a GGUF file,
imported once into an HF directory: importing.py), a local HF directory, or a hub id. A pool keeps recently used models loaded; its owner is a `Backends` (backends/select.py), so the
stages of one process (one Prefect flow run) never reload a model between tasks. The runner takes the
policy out of the pool for the update stage to train it, and puts the trained model back under its new
checkpoint's key.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from rlme_pipeline.models.building import BUILDING
from rlme_pipeline.storage.store import sha256_file

# Our own rich bars report progress; transformers' per-shard bars only add noise to logs.
try:
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def master_dtype(dtype: str) -> str:
    """The dtype a policy configured as `dtype` is trained in. Half-precision policies keep float32
    master weights (and so float32 AdamW state) and compute in `dtype` under autocast: an update of a bf16
    weight w smaller than about |w| * 2^-9 rounds away, so pure-bf16 AdamW silently drops small steps."""
    return "float32" if dtype in ("bfloat16", "float16") else dtype


def inference_copy(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A frozen copy of fp32 master weights in `dtype`: exactly what loading their checkpoint with
    from_pretrained(dtype=...) gives (parameters rounded to `dtype`, buffers as built, shared weights
    still shared), without writing or reading a file. It generates and judges; the master trains."""
    target = DTYPES[dtype]
    memo = {id(p): torch.nn.Parameter(p.detach().to(target), requires_grad=False) for p in model.parameters()}
    clone = copy.deepcopy(model, memo)
    clone.config.dtype = target
    return clone.eval()


def resolve_ref(ref: str) -> str:
    """A reference as something from_pretrained accepts."""
    if ref.startswith("tiny:"):
        from rlme_pipeline.models.tiny import resolve_tiny

        return str(resolve_tiny(ref.removeprefix("tiny:")))
    if ref.startswith("gguf:"):
        from rlme_pipeline.models.importing import import_model

        return str(import_model(ref))
    return ref


_version_cache: dict[tuple, str] = {}


def weights_version(path: str) -> str:
    """sha256 over the weight files of a local model directory (cached by size and mtime)."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin")) if p.is_dir() else []
    if not files:
        return f"ref:{path}"  # a hub id without a local copy: the reference is all we know
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _version_cache:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
        _version_cache[key] = h.hexdigest()
    return _version_cache[key]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    version: str
    path: str
    # The optimizer whose state is saved beside `path`, kept so that the next update need not read it back.
    optimizer: torch.optim.Optimizer | None = None
    # The torch RNG states at the end of the update that made these weights: the next update continues
    # from them (a light checkpoint, checkpoint.full_every, holds no rng.safetensors to read them back from).
    rng: dict[str, torch.Tensor] | None = None


class ModelPool:
    """Loaded models by (path, dtype, device), least recently used evicted past `capacity`. A training
    process sizes it to every model its config names (`weights_at.pool_capacity`): an eviction there
    means a reload from disk (and the optimizer state with it) on the next use, every iteration."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._items: OrderedDict[tuple, Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, dtype: str = "float32", device: str = "cpu", version: str | None = None) -> Loaded:
        key = (path, dtype, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = self._load(path, dtype, device, version)
        self.put(key, loaded)
        return loaded

    def _load(self, path: str, dtype: str, device: str, version: str | None) -> Loaded:
        from transformers import AutoModelForCausalLM

        with BUILDING:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        model = model.to(device).eval()
        return Loaded(model, load_tokenizer(path), version or weights_version(path), path)

    def put(self, key: tuple, loaded: Loaded) -> None:
        with self._lock:
            self._items[key] = loaded
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def take(
        self, path: str, dtype: str = "float32", device: str = "cpu", version: str | None = None, keep: bool = False
    ) -> Loaded:
        """A model the caller will change the weights of, out of the pool (loaded if absent, without
        passing through the pool: that could evict a model still needed). keep=True: the pooled model is
        still needed unchanged (the policy at iteration 0 is also the frozen self or the KL reference), so
        the caller gets a copy made in memory and the pooled one stays."""
        key = (path, dtype, device)
        with self._lock:
            loaded = self._items.get(key) if keep else self._items.pop(key, None)
        if loaded is None:
            loaded = self._load(path, dtype, device, version)
            if keep:
                self.put(key, Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.version, path))
            return loaded
        if keep:
            return Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.version, path)
        return loaded

    def peek(self, path: str, dtype: str = "float32", device: str = "cpu") -> Loaded | None:
        """The pooled model, or None: never loads (a caller that can do without it reads nothing; whether
        the trainer kept its optimizer decides between a plain load and a replay, jobs/replay.py)."""
        with self._lock:
            return self._items.get((path, dtype, device))

    def discard(self, path: str, dtype: str = "float32", device: str = "cpu") -> None:
        """Forget a model (if loaded): its weights are stale."""
        with self._lock:
            self._items.pop((path, dtype, device), None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
