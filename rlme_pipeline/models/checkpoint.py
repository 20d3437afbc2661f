"""Policy checkpoints: weights and optimizer state in safetensors, structure in JSON, no pickles.

    iter-000003/checkpoint.5d0e71aa/model.safetensors, config.json, tokenizer files  (an ordinary HF directory)
    iter-000003/checkpoint.5d0e71aa/optimizer/state.json   the optimizer's state_dict with every tensor
                                                            replaced by a reference (param groups, ids, steps)
    iter-000003/checkpoint.5d0e71aa/optimizer/tensors-00001-of-00002.safetensors   those tensors, in shards
    iter-000003/checkpoint.5d0e71aa/rng.safetensors     torch RNG states at the end of the update
    iter-000003/checkpoint.5d0e71aa/trainer_state.json  step counts, data cursor, seed

A LoRA policy (policy.lora, adapters.py) writes adapter_model.safetensors + adapter_config.json (a peft
adapter directory) in place of model.safetensors + config.json, its optimizer state covers the adapter
only, and trainer_state.json records the base's weights hash under `base`.

With `checkpoint.full_every` N > 1 only every N-th checkpoint (and the last of each `rlme train` call, and
one made on SIGTERM) holds the whole training state above; the others are light: model.safetensors in the
policy's dtype, config.json, tokenizer files and trainer_state.json, no optimizer/ and no rng.safetensors
(`take`, `is_full`). Resuming from a light checkpoint replays the updates since the last full one
(jobs/replay.py).

The directory name is attempt-unique (see run.py); manifests list its files under the logical names
iter-000003/checkpoint/{file}. Prompts and sampling seeds derive from (seed, iteration, ...), so the
data cursor is recorded for audits but never needed to resume. The learning rate is constant (there is
no scheduler to save yet); a scheduler's state_dict would go through the same JSON + tensors encoding.
The optimizer state sits in its own folder so that a server loading every top-level *.safetensors of a
checkpoint (vLLM) never mistakes it for weights. Checkpoints written before this format hold optimizer.pt
(torch.save); it is still read, with torch.load(weights_only=True), so that old runs resume.
On object storage a checkpoint is downloaded once into $RLME_CACHE/checkpoints/{hash of its file hashes}/
(the process that wrote it puts it there as it writes). The weights are stored in the training dtype:
fp32 master weights for a bf16/fp16 policy (models.master_dtype), so a resumed run continues from exactly
the weights the uninterrupted one holds; every reader loads them in its configured dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file

from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.run import CorruptRun, Run, iter_dir
from rlme_pipeline.storage.store import FileEntry, sha256_file

WEIGHTS = "model.safetensors"
OPTIMIZER_STATE = "optimizer/state.json"
LEGACY_OPTIMIZER = "optimizer.pt"  # read only: checkpoints written before optimizer/state.json
RNG = "rng.safetensors"
STATE = "trainer_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # a LoRA policy's checkpoint: a peft adapter directory
ADAPTER_CONFIG = "adapter_config.json"


def cache_dir() -> Path:
    return Path(os.environ.get("RLME_CACHE", Path.home() / ".cache" / "rlme"))


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{d}"] = s
    return state


def restore_rng(path: str | None, seed: int) -> None:
    """Continue the torch RNG from a checkpoint's rng.safetensors, or start it from `seed`."""
    f = Path(path) / RNG if path else None
    if f is None or not f.exists():
        torch.manual_seed(seed)
        return
    set_rng(load_file(f))


def set_rng(state: dict[str, torch.Tensor]) -> None:
    """Put back torch RNG states taken by `rng_state` (from a checkpoint, or kept in memory)."""
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            if (s := state.get(f"torch_cuda_{d}")) is not None:
                torch.cuda.set_rng_state(s, d)


def save(
    run: Run,
    iteration: int,
    model,
    tokenizer,
    optimizer,
    state: dict,
    *,
    full: bool = True,
    dtype: str | None = None,
    gathered: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> list[FileEntry]:
    """Write the checkpoint into a fresh, attempt-unique directory and describe its files: `take` now,
    `Checkpoint.write` at once (see both)."""
    return take(run, iteration, model, tokenizer, optimizer, state, full=full, dtype=dtype, gathered=gathered).write()


def take(
    run: Run,
    iteration: int,
    model,
    tokenizer,
    optimizer,
    state: dict,
    *,
    full: bool = True,
    dtype: str | None = None,
    gathered: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> Checkpoint:
    """The checkpoint of the update that just ended, ready to write (`Checkpoint.write`), now or in the
    background. The small files (config, tokenizer, RNG, trainer state, the optimizer's structure) are
    taken as bytes here, so the torch RNG is the update's even if the write comes later; the big ones are
    references to the live tensors, so nothing is copied in memory, and nothing may change them until the
    write returns (the runner joins a background write before the next update).

    `full`: the whole training state, what a resume continues from as it is: the weights in the training
    dtype (the fp32 master weights of a half-precision policy), the optimizer state and the torch RNG. A
    light checkpoint (`full` False, between the full states of `checkpoint.full_every`) holds the policy's
    weights alone, in `dtype` (the policy's, so a bf16 policy writes 2 bytes per parameter where the full
    state writes 12 or more), with config, tokenizer and trainer state: an ordinary HF directory that
    generation, a live-self evaluator, a re-score and export read like any other; resuming from it replays
    the updates since the last full state (jobs/replay.py).

    `gathered`: (model state dict, optimizer state_dict) gathered onto the host from FSDP shards
    (update_fsdp.py); they are written in place of the model's and optimizer's own, which hold shards.
    """
    if is_adapted(model):
        weights_name, weights = ADAPTER_WEIGHTS, adapter_tensors(model)
        meta = {**_tokenizer_files(tokenizer), ADAPTER_CONFIG: adapter_config_bytes(model)}
    else:
        weights_name, meta = WEIGHTS, _metadata_files(model, tokenizer)
        weights = weights_in(model, None if full else dtype, gathered[0] if gathered else None)
    big, small = {weights_name: weights}, {**meta, STATE: json.dumps(state, indent=2, sort_keys=True).encode()}
    if full:
        optimizer_state = gathered[1] if gathered else optimizer.state_dict()
        structure, shards = optimizer_files(optimizer_state, target_bytes=_nbytes(weights.values()))
        big |= shards
        small |= {RNG: safetensors.torch.save(rng_state()), OPTIMIZER_STATE: structure}
    return Checkpoint(run, iteration, big, small)


class Checkpoint:
    """A checkpoint taken (`take`), not yet written: its big files as tensors, its small ones as bytes."""

    def __init__(self, run: Run, iteration: int, big: dict[str, dict[str, torch.Tensor]], small: dict[str, bytes]):
        self.run, self.iteration, self.big, self.small = run, iteration, big, small

    def write(self, stream=None, background: bool = False) -> list[FileEntry]:
        """Write every file into a fresh, attempt-unique directory (each call another: a write that failed
        can be written again) and describe them.

        The weights and the optimizer state (12 of every 16 bytes per parameter under AdamW) are streamed,
        tensor by tensor, into the store by `Store.write_stream`, which hashes the bytes on their way out:
        nothing is held twice in memory or read back. sha256 is sequential within a file, so the optimizer's
        tensors are split into shards about the size of the weights file and every big file gets its own
        thread (host copies, file writes, S3 uploads and sha256 all release the GIL): the longest file, not
        the sum, sets the time. A local file is fsynced before its entry is returned and an S3 object exists
        only once its upload completed, so the stage record (written by the caller after this returns) and
        the manifest after it never list a file that is not durable; a crash leaves an unreferenced directory
        for `rlme gc`. When the store is not on this machine the same bytes also go into the download cache,
        so the next iteration (or a live-self evaluator) never fetches what was just uploaded.

        `stream`: a CUDA stream that device-to-host copies are queued on (a background write's side stream,
        so they do not queue behind the next iteration's kernels); `background`: this write runs beside the
        next iteration (its own crash point, upload:background)."""
        run, iteration = self.run, self.iteration
        logical, physical = run.new_path(iteration, "checkpoint")
        cache = (
            None
            if run.store.local_path(physical)
            else Path(tempfile.mkdtemp(prefix="rlme-ckpt-", dir=_checkpoints_cache()))
        )

        def write(name: str, fill) -> FileEntry:
            def tee(out):
                if cache is None:
                    return fill(out)
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                with open(cache / name, "wb") as copy:
                    fill(_Tee(out, copy))

            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                entry = run.store.write_stream(f"{physical}/{name}", tee, name=f"{logical}/{name}")
            crash_point("upload:mid", iteration)
            if background:
                crash_point("upload:background", iteration)
            return entry

        try:
            with ThreadPoolExecutor(max_workers=len(self.big)) as pool:
                futures = [
                    pool.submit(write, name, lambda f, t=tensors: write_safetensors(f, t))
                    for name, tensors in self.big.items()
                ]
                files = [write(name, lambda f, data=data: f.write(data)) for name, data in sorted(self.small.items())]
                files += [f.result() for f in futures]
            if cache is not None:
                _install(cache, _checkpoints_cache() / _cache_key(files))
        finally:
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
        return sorted(files, key=lambda f: f.path)


def is_full(files: list[FileEntry]) -> bool:
    """Whether a checkpoint's files hold the whole training state (an optimizer state: the RNG and the
    training-dtype weights come with it), so that a resume continues from it as it is."""
    return any(f.logical.endswith(("/" + OPTIMIZER_STATE, "/" + LEGACY_OPTIMIZER)) for f in files)


def weights_in(model, dtype: str | None = None, gathered: dict[str, torch.Tensor] | None = None) -> dict:
    """model.safetensors' tensors: in the training dtype (`weights_of`), or rounded to `dtype` (a light
    checkpoint of a half-precision policy: what loading the full file with that dtype gives, 2 bytes per
    parameter instead of 4)."""
    weights = weights_of(model, gathered)
    if dtype is None:
        return weights
    from rlme_pipeline.models.loading import DTYPES

    target = DTYPES[dtype]
    return {k: t.to(target) if t.is_floating_point() else t for k, t in weights.items()}


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of the model.safetensors `write_safetensors` makes of `tensors` (the policy version such
    a checkpoint has), without writing it: how a replayed update is checked against the committed one."""
    sink = _Sha256()
    write_safetensors(sink, tensors)
    return sink.h.hexdigest()


def weights_of(model, gathered: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, in their training dtype (the fp32 master weights of a
    half-precision policy: resuming must continue from them, not from a rounded copy). A weight tied to an
    earlier one (lm_head to the embeddings) is stored once, under the first name, as transformers does.
    `gathered`: the full tensors by name, when the model itself holds FSDP shards (DTensors; tied weights
    share one, so the model still says which names to keep)."""
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            tensors[name] = (gathered[name] if gathered is not None else t).detach()
    return tensors


def is_adapted(model) -> bool:
    """A peft model (a LoRA policy): its checkpoint is the adapter, not the weights."""
    try:
        from peft import PeftModel
    except ImportError:  # the `lora` extra is not installed: nothing can be adapted
        return False

    return isinstance(model, PeftModel)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's own names (what save_pretrained writes)."""
    from peft import get_peft_model_state_dict

    return {k: t.detach() for k, t in get_peft_model_state_dict(model).items()}


def adapter_config_bytes(model) -> bytes:
    """adapter_config.json as peft writes it (the checkpoint is a directory peft can load), made stable."""
    with tempfile.TemporaryDirectory(prefix="rlme-adapter-") as tmp:
        model.peft_config["default"].save_pretrained(tmp)
        doc = json.loads((Path(tmp) / ADAPTER_CONFIG).read_text())
    # peft keeps target_modules as a set: its order follows the process's string hash seed, so a resumed
    # process would write different bytes. Sorted, the file is a function of the config alone.
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(doc.get(key), list):
            doc[key] = sorted(doc[key])
    return json.dumps(doc, indent=2, sort_keys=True).encode()


# --- the optimizer state: JSON for the structure, safetensors shards for the tensors -----------------
MIN_SHARD_BYTES = 64 * 2**20  # below this a shard's thread costs more than it saves


def optimizer_files(state_dict: dict, target_bytes: int) -> tuple[bytes, dict[str, dict[str, torch.Tensor]]]:
    """(optimizer/state.json, {shard name: its tensors}) for an optimizer's state_dict.

    The JSON is the state_dict with each tensor replaced by {"__tensor__": name} (tuples and dicts with
    non-string keys tagged, so loading gives back exactly the same Python structure). The tensors are
    packed, largest first into the lightest shard, into about total/target_bytes shards (at most one per
    CPU core), so that no shard takes longer to write and hash than the weights file beside it."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state_dict, tensors, "")
    total = _nbytes(tensors.values())
    n = max(1, min(round(total / max(target_bytes, MIN_SHARD_BYTES)), os.cpu_count() or 1))
    loads, groups = [0] * n, [set() for _ in range(n)]
    for name in sorted(tensors, key=lambda k: -_nbytes([tensors[k]])):  # stable: ties keep their order
        i = loads.index(min(loads))
        groups[i].add(name)
        loads[i] += _nbytes([tensors[name]])
    groups = [g for g in groups if g]
    shards = {
        f"optimizer/tensors-{i + 1:05d}-of-{len(groups):05d}.safetensors": {k: t for k, t in tensors.items() if k in g}
        for i, g in enumerate(groups)
    }
    doc = {"format": "rlme-optimizer/1", "shards": [name.rpartition("/")[2] for name in shards], "state_dict": encoded}
    return json.dumps(doc, indent=1).encode(), shards


def load_optimizer_state(path: str) -> dict | None:
    """The optimizer state_dict a checkpoint directory holds, for `optimizer.load_state_dict`; None if
    it holds none. The shards are read in parallel threads (safetensors reads release the GIL)."""
    d = Path(path)
    if (d / OPTIMIZER_STATE).exists():
        doc = json.loads((d / OPTIMIZER_STATE).read_text())
        folder = (d / OPTIMIZER_STATE).parent
        tensors: dict[str, torch.Tensor] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(doc["shards"]))) as pool:
            for part in pool.map(lambda name: load_file(folder / name), doc["shards"]):
                tensors.update(part)
        return _decode(doc["state_dict"], tensors, folder)
    if (d / LEGACY_OPTIMIZER).exists():
        return torch.load(d / LEGACY_OPTIMIZER, weights_only=True, map_location="cpu")
    return None


def _encode(obj, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"optimizer state: two values map to the tensor name {path!r}")
        tensors[path] = obj.detach()
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        if not all(k is None or isinstance(k, (str, int, float)) for k in obj):
            raise TypeError(
                f"optimizer state: a dict key at {path or '/'} is a {type(next(iter(obj))).__name__}; "
                "only strings and numbers can be saved"
            )
        return {"__items__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"optimizer state: {path or '/'} is a {type(obj).__name__}; only tensors, numbers, strings, "
        "None, lists, tuples and dicts can be saved (without pickle)"
    )


def _decode(obj, tensors: dict[str, torch.Tensor], where: Path):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CorruptRun(f"optimizer state in {where}: tensor {obj['__tensor__']!r} is in none of its shards")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- streaming tensors to a file ---------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CHUNK_BYTES = 64 * 2**20  # one staging buffer: ~3 ms of PCIe, ~40 ms of sha256 + write


def write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The safetensors format (a little-endian u64 header size, a JSON header padded to 8 bytes, then
    every tensor's bytes back to back), written tensor by tensor: the safetensors library only writes a
    whole file from one in-memory buffer or to a path, and either would mean holding or re-reading it."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be written to safetensors by rlme")
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for chunk in host_bytes(tensors.values()):
        f.write(chunk)


def host_bytes(tensors, chunk_bytes: int = CHUNK_BYTES):
    """The raw bytes of `tensors`, in order, as host buffers to write; each is valid until the next is
    asked for. A CPU tensor is passed on as it is (no copy); device tensors go through `_Staging`."""
    staging = _Staging(chunk_bytes)
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if flat.device.type != "cpu":
            yield from staging.add(flat)
            continue
        yield from staging.flush()  # what was queued before this tensor goes out first
        if flat.numel():
            yield flat.numpy().data
    yield from staging.flush()


class _Staging:
    """Device-to-host copies through two pinned buffers of chunk_bytes, used in turn: the copies into one
    are queued asynchronously (non_blocking) and waited for once, by an event, when it is handed out,
    while the caller writes and hashes the other. Host memory stays at two buffers however big the state
    (a tensor larger than a buffer is split across several); one blocking .cpu() per tensor would stall
    the writer at every tensor and copy through pageable memory."""

    def __init__(self, chunk_bytes: int):
        self.chunk, self.buffers, self.current, self.used = chunk_bytes, [], 0, 0
        self.devices: set[torch.device] = set()  # devices with copies queued into the current buffer
        self.sealed = None  # (the filled part of the other buffer, its events): handed out next

    def add(self, flat: torch.Tensor):
        if not self.buffers:
            pin = flat.device.type == "cuda"
            self.buffers = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        pos = 0
        while pos < flat.numel():
            n = min(self.chunk - self.used, flat.numel() - pos)
            self.buffers[self.current][self.used : self.used + n].copy_(flat[pos : pos + n], non_blocking=True)
            self.used, pos = self.used + n, pos + n
            if flat.device.type == "cuda":
                self.devices.add(flat.device)
            if self.used == self.chunk:
                yield from self._seal()

    def flush(self):
        yield from self._seal()  # the current buffer is sealed, the one sealed before goes out
        yield from self._seal()  # and then the current one

    def _seal(self):
        ready = self.sealed
        self.sealed = None
        if self.used:
            events = []
            for device in self.devices:  # recorded on the stream the copies were queued on
                events.append(torch.cuda.Event())
                events[-1].record(torch.cuda.current_stream(device))
            self.sealed = (self.buffers[self.current][: self.used], events)
            self.current, self.used, self.devices = 1 - self.current, 0, set()
        if ready is not None:
            view, events = ready
            for e in events:
                e.synchronize()
            yield view.numpy().data


class _Sha256:
    """A file that only hashes what is written to it."""

    def __init__(self):
        self.h = hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return memoryview(data).nbytes


class _Tee:
    """Write to two binary files at once."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def write(self, data) -> int:
        self.b.write(data)
        return self.a.write(data)

    def flush(self) -> None:
        self.a.flush()
        self.b.flush()


def _metadata_files(model, tokenizer) -> dict[str, bytes]:
    """config.json, generation_config.json and the tokenizer files (kilobytes): written by transformers
    into a scratch directory, then taken as bytes."""
    with tempfile.TemporaryDirectory(prefix="rlme-ckpt-meta-") as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer files alone (an adapter directory has no config.json: it is not a full model)."""
    with tempfile.TemporaryDirectory(prefix="rlme-ckpt-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}


def _checkpoints_cache() -> Path:
    d = cache_dir() / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cache_key(files: list[FileEntry]) -> str:
    return hashlib.sha256("".join(sorted(f"{_name(f)}:{f.sha256}\n" for f in files)).encode()).hexdigest()


def _name(f: FileEntry) -> str:
    """A file's path inside its checkpoint directory (iter-000003/checkpoint.5d0e71aa/{name})."""
    return f.path.split("/", 2)[2]


def _install(tmp: Path, target: Path) -> None:
    """Move a complete local copy into the cache; another process may have installed the same first."""
    (tmp / ".complete").write_text("")
    try:
        os.rename(tmp, target)
    except OSError:
        pass  # the caller removes tmp if it is still there


def files_of(entries: list[FileEntry], iteration: int) -> list[FileEntry]:
    """The checkpoint's entries among an iteration's files."""
    prefix = f"{iter_dir(iteration)}/checkpoint/"
    return [f for f in entries if f.logical.startswith(prefix)]


def weights_entry(files: list[FileEntry]) -> FileEntry:
    """The policy's weights file (its hash is the policy version): the model's, or a LoRA adapter's."""
    return next(f for f in files if f.logical.endswith(("/" + WEIGHTS, "/" + ADAPTER_WEIGHTS)))


def drop_cached(files: list[FileEntry]) -> None:
    """Remove this machine's download-cache copy of a checkpoint (retention pruned it from the store)."""
    shutil.rmtree(_checkpoints_cache() / _cache_key(files), ignore_errors=True)


def local_dir(run: Run, iteration: int, files: list[FileEntry]) -> str:
    """A local directory holding the checkpoint's files: the store's own when it is on this machine (hashes
    were checked when its stage record was accepted), else a verified download cached by content."""
    weights = weights_entry(files)
    if here := run.store.local_path(weights.path.rpartition("/")[0]):
        return here
    target = _checkpoints_cache() / _cache_key(files)
    if not (target / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix="dl-", dir=target.parent))
        for f in files:
            local = tmp / _name(f)
            local.parent.mkdir(parents=True, exist_ok=True)
            run.store.get_file(f.path, local)
            if sha256_file(local) != f.sha256:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CorruptRun(
                    f"checkpoint file {run.store.where(f.path)} does not match its recorded sha256; "
                    f"run `rlme verify {run.url}`"
                )
        _install(tmp, target)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
