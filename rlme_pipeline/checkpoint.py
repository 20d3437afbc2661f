"""Policy checkpoints: weights in safetensors, optimizer state loaded with weights_only=True, no pickles.

    iter-000003/checkpoint.5d0e71aa/model.safetensors, config.json, tokenizer files  (an ordinary HF directory)
    iter-000003/checkpoint.5d0e71aa/optimizer.pt        tensors and numbers only (torch.load weights_only=True)
    iter-000003/checkpoint.5d0e71aa/rng.safetensors     torch RNG states at the end of the update
    iter-000003/checkpoint.5d0e71aa/trainer_state.json  step counts, data cursor, seed

The directory name is attempt-unique (see run.py); manifests list its files under the logical names
iter-000003/checkpoint/{file}. Prompts and sampling seeds derive from (seed, iteration, ...), so the
data cursor is recorded for audits but never needed to resume. The learning rate is constant (there is
no scheduler to save yet); a scheduler's state_dict belongs in optimizer.pt.
On object storage a checkpoint is downloaded once into $RLME_CACHE/checkpoints/{hash of its file hashes}/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
    """Write the checkpoint into a fresh, attempt-unique directory; the stage record that lists its files
    is written only after all of them, so a crash leaves an unreferenced directory for `rlme gc`.
    A local store is written in place (no second copy of the weights and optimizer state). On object
    storage the checkpoint is written to a local directory and uploaded file by file (large files in
    parts); the local copy then becomes the download cache entry, so the next iteration (or a live-self
    evaluator) does not fetch back what was just uploaded."""
    logical, physical = run.new_path(iteration, "checkpoint")
    if run.store.is_local:
        target = Path(run.store.abs(physical))
        _write(target, model, tokenizer, optimizer, state)
        return [run.store.adopt(f"{physical}/{f.name}", name=f"{logical}/{f.name}") for f in sorted(target.iterdir())]
    parent = cache_dir() / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rlme-ckpt-", dir=parent))
    try:
        _write(tmp, model, tokenizer, optimizer, state)
        files = []
        for f in sorted(tmp.iterdir()):
            files.append(run.store.put_file(f, f"{physical}/{f.name}", name=f"{logical}/{f.name}"))
            crash_point("upload:mid", iteration)
        _install(tmp, parent / _cache_key(files))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _write(target: Path, model, tokenizer, optimizer, state: dict) -> None:
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    torch.save(optimizer.state_dict(), target / OPTIMIZER)
    save_file(rng_state(), target / RNG)
    (target / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


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
    """A local directory holding the checkpoint's files: the store itself when it is local (hashes were
    checked when its stage record was accepted), else a verified download cached by content."""
    weights = weights_entry(files)
    if run.store.is_local:
        return run.store.abs(weights.path.rpartition("/")[0])
    target = cache_dir() / "checkpoints" / _cache_key(files)
    if not (target / ".complete").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
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
