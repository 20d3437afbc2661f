"""Policy checkpoints: weights in safetensors, optimizer state loaded with weights_only=True, no pickles.

    iter-000003/checkpoint/model.safetensors, config.json, tokenizer files    (an ordinary HF directory)
    iter-000003/checkpoint/optimizer.pt                                       (tensors and numbers only)
    iter-000003/checkpoint/trainer_state.json                                 (step, data cursor, seeds)

All randomness is derived from (seed, iteration, ...) so no RNG state is needed to resume exactly.
On object storage a checkpoint is downloaded once into $RLME_CACHE/checkpoints/{sha256}/.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlme_pipeline.run import Run
from rlme_pipeline.storage import FileEntry, sha256_file

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"


def cache_dir() -> Path:
    return Path(os.environ.get("RLME_CACHE", Path.home() / ".cache" / "rlme"))


def save(run: Run, iteration: int, model, tokenizer, optimizer, state: dict) -> list[FileEntry]:
    """Write the checkpoint into a local temp dir, then upload file by file (data first: the stage
    record that lists these files is written only after all of them)."""
    rel = run.rel(iteration, "checkpoint")
    with tempfile.TemporaryDirectory(prefix="rlme-ckpt-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), Path(tmp) / OPTIMIZER)
        (Path(tmp) / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
        return [run.store.put_file(f, f"{rel}/{f.name}") for f in sorted(Path(tmp).iterdir()) if f.is_file()]


def weights_entry(files: list[FileEntry]) -> FileEntry:
    return next(f for f in files if f.path.endswith("/" + WEIGHTS))


def local_dir(run: Run, iteration: int, files: list[FileEntry]) -> str:
    """A local directory holding the checkpoint's files: the store itself when it is local."""
    rel = run.rel(iteration, "checkpoint")
    if run.store.is_local:
        return run.store.abs(rel)
    target = cache_dir() / "checkpoints" / weights_entry(files).sha256
    if not (target / ".complete").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="dl-", dir=target.parent))
        for f in files:
            run.store.get_file(f.path, tmp / Path(f.path).name)
            if sha256_file(tmp / Path(f.path).name) != f.sha256:
                raise IOError(f"checkpoint file {f.path} does not match its recorded sha256; run `rlme verify`")
        (tmp / ".complete").write_text("")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_optimizer_state(path: str) -> dict | None:
    f = Path(path) / OPTIMIZER
    return torch.load(f, weights_only=True, map_location="cpu") if f.exists() else None
