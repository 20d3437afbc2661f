"""Policy checkpoints: weights in safetensors, optimizer state loaded with weights_only=True, no pickles.

    iter-000003/checkpoint.5d0e71aa/model.safetensors, config.json, tokenizer files  (an ordinary HF directory)
    iter-000003/checkpoint.5d0e71aa/optimizer.pt        tensors and numbers only (torch.load weights_only=True)
    iter-000003/checkpoint.5d0e71aa/rng.safetensors     torch RNG states at the end of the update
    iter-000003/checkpoint.5d0e71aa/trainer_state.json  step counts, data cursor, seed

The directory name is attempt-unique (see run.py); manifests list its files under the logical names
iter-000003/checkpoint/{file}. Prompts and sampling seeds derive from (seed, iteration, ...), so the
data cursor is recorded for audits but never needed to resume. The learning rate is constant (there is
no scheduler to save yet); a scheduler's state_dict belongs in optimizer.pt.
On object storage a checkpoint is downloaded once into $RLME_CACHE/checkpoints/{hash of its file hashes}/
(the process that wrote it puts it there as it writes). The weights are stored in the training dtype:
fp32 master weights for a bf16/fp16 policy (models.master_dtype), so a resumed run continues from exactly
the weights the uninterrupted one holds; every reader loads them in its configured dtype.
"""

from __future__ import annotations

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

from rlme_pipeline.crash import crash_point
from rlme_pipeline.run import CorruptRun, Run, iter_dir
from rlme_pipeline.storage import FileEntry, sha256_file

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
STATE = "trainer_state.json"


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
    state = load_file(f)
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            if (s := state.get(f"torch_cuda_{d}")) is not None:
                torch.cuda.set_rng_state(s, d)


def save(run: Run, iteration: int, model, tokenizer, optimizer, state: dict) -> list[FileEntry]:
    """Write the checkpoint into a fresh, attempt-unique directory and describe its files.

    The weights and the optimizer state (12 of every 16 bytes per parameter) are streamed, tensor by
    tensor, into the store by `Store.write_stream`, which hashes the bytes on their way out: nothing is
    held twice in memory or read back. The two are written in parallel threads (copies to the host, file
    writes, S3 uploads and sha256 all release the GIL). A local file is fsynced before its entry is
    returned and an S3 object exists only once its upload completed, so the stage record (written by the
    caller after this returns) and the manifest after it never list a file that is not durable; a crash
    leaves an unreferenced directory for `rlme gc`. When the store is not on this machine the same bytes
    also go into the download cache, so the next iteration (or a live-self evaluator) never fetches what
    was just uploaded.
    """
    logical, physical = run.new_path(iteration, "checkpoint")
    cache = None if run.store.local_path(physical) else Path(tempfile.mkdtemp(prefix="rlme-ckpt-", dir=_checkpoints_cache()))

    def write(name: str, fill) -> FileEntry:
        def tee(out):
            if cache is None:
                return fill(out)
            with open(cache / name, "wb") as copy:
                fill(_Tee(out, copy))

        entry = run.store.write_stream(f"{physical}/{name}", tee, name=f"{logical}/{name}")
        crash_point("upload:mid", iteration)
        return entry

    small = {**_metadata_files(model, tokenizer), RNG: safetensors.torch.save(rng_state()),
             STATE: json.dumps(state, indent=2, sort_keys=True).encode()}
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            big = [pool.submit(write, WEIGHTS, lambda f: write_safetensors(f, weights_of(model))),
                   pool.submit(write, OPTIMIZER, lambda f: torch.save(optimizer.state_dict(), f))]
            files = [write(name, lambda f, data=data: f.write(data)) for name, data in sorted(small.items())]
            files += [f.result() for f in big]
        if cache is not None:
            _install(cache, _checkpoints_cache() / _cache_key(files))
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    return sorted(files, key=lambda f: f.path)


def weights_of(model) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, in their training dtype (the fp32 master weights of a
    half-precision policy: resuming must continue from them, not from a rounded copy). A weight tied to an
    earlier one (lm_head to the embeddings) is stored once, under the first name, as transformers does."""
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            tensors[name] = t.detach()
    return tensors


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The safetensors format (a little-endian u64 header size, a JSON header padded to 8 bytes, then
    every tensor's bytes back to back), written tensor by tensor: the safetensors library only writes a
    whole file from one in-memory buffer or to a path, and either would mean holding or re-reading it."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for t in tensors.values():
        if t.numel():
            f.write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


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


def _checkpoints_cache() -> Path:
    d = cache_dir() / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cache_key(files: list[FileEntry]) -> str:
    return hashlib.sha256("".join(sorted(f"{Path(f.path).name}:{f.sha256}\n" for f in files)).encode()).hexdigest()


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
    return next(f for f in files if f.logical.endswith("/" + WEIGHTS))


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
            local = tmp / Path(f.path).name
            run.store.get_file(f.path, local)
            if sha256_file(local) != f.sha256:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CorruptRun(f"checkpoint file {run.store.where(f.path)} does not match its recorded sha256; "
                              f"run `rlme verify {run.url}`")
        _install(tmp, target)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_optimizer_state(path: str) -> dict | None:
    f = Path(path) / OPTIMIZER
    return torch.load(f, weights_only=True, map_location="cpu") if f.exists() else None
