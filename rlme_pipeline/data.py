"""Prompts: loaded through Hugging Face `datasets`, and the deterministic slice each iteration trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from rlme_pipeline.config import Config, ConfigError, DataConfig

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompts(cfg: Config, data: DataConfig | None = None, field: str = "data") -> pl.DataFrame:
    """All prompts of `data` (default cfg.data) as (prompt_id, prompt, label); columns are checked here,
    before any model loads; errors name `field`.

    Memoised per process on the data settings and, for a local file, its size and mtime: every iteration's
    generate stage asks for the prompts, and `datasets.load_dataset` costs ~0.5 s each time (fingerprints,
    lock files, Arrow cache) on a small CPU machine: a large share of a tiny iteration."""
    d = data or cfg.data
    path = cfg.resolve(d.path)
    st = Path(path).stat() if Path(path).is_file() else None
    key = (path, st and (st.st_size, st.st_mtime_ns), d.split, d.prompt_column, d.id_column, d.label_column)
    if key not in _CACHE:
        if len(_CACHE) >= 2:  # the training prompts and the held-out ones; keep memory flat otherwise
            _CACHE.clear()
        _CACHE[key] = _load(d, path, field)
    return _CACHE[key]


_CACHE: dict[tuple, pl.DataFrame] = {}


def heldout_prompts(cfg: Config) -> pl.DataFrame:
    """The held-out prompts of `eval` (its file, or data.path at eval.split), with data's columns; the
    first eval.prompts in a stable order of their ids (a hash, so not the file's order)."""
    import hashlib

    e = cfg.eval
    # a file of its own is read as datasets names a single file's split; data.path needs eval.split (config.py)
    data = cfg.data.model_copy(update={"path": e.path or cfg.data.path, "split": e.split or "train"})
    prompts = load_prompts(cfg, data, field="eval")
    key = [hashlib.sha256(f"eval/{p}".encode()).hexdigest() for p in prompts["prompt_id"]]
    return prompts.with_columns(_k=pl.Series(key, dtype=pl.String)).sort("_k").head(e.prompts).drop("_k")


def _load(d: DataConfig, path: str, field: str) -> pl.DataFrame:
    import datasets  # heavy import, only where used

    suffix = Path(path).suffix.lower()
    if Path(path).is_file():
        if suffix not in _BUILDERS:
            raise ConfigError(
                f"{field}.path: {path!r} has an unsupported extension; use .jsonl, .json, .parquet or .csv"
            )
        try:
            ds = datasets.load_dataset(_BUILDERS[suffix], data_files=path, split=d.split)
        except ValueError as e:  # an unknown split: a single file has one, "train"
            raise ConfigError(f"{field}.split: {d.split!r} cannot be read from {path} ({e})") from None
    elif Path(path).exists() or path.startswith(("./", "../", "/")):
        raise ConfigError(f"{field}.path: {path!r} is not a file; give a .jsonl/.parquet file or a hub data set name")
    else:
        try:
            ds = datasets.load_dataset(path, split=d.split)
        except Exception as e:  # datasets raises many types for "not found" / offline
            raise ConfigError(f"{field}.path: could not load data set {path!r} ({type(e).__name__}: {e})") from None

    cols = ds.column_names
    for name, col in (
        ("prompt_column", d.prompt_column),
        ("id_column", d.id_column),
        ("label_column", d.label_column),
    ):
        if col is not None and col not in cols:
            raise ConfigError(f"data.{name}: column {col!r} is not in {path} (columns: {cols})")
    if len(ds) == 0:
        raise ConfigError(f"{field}.path: {path} has no rows")

    ids = [str(x) for x in ds[d.id_column]] if d.id_column else [str(i) for i in range(len(ds))]
    labels = [None if x is None else str(x) for x in ds[d.label_column]] if d.label_column else [None] * len(ds)
    df = pl.DataFrame(
        {"prompt_id": ids, "prompt": [str(p) for p in ds[d.prompt_column]], "label": labels},
        schema={"prompt_id": pl.String, "prompt": pl.String, "label": pl.String},
    )
    if df["prompt_id"].n_unique() != df.height:
        raise ConfigError(f"data.id_column: {d.id_column!r} has duplicate values in {path}; prompt ids must be unique")
    return df


def prompt_indices(n_prompts: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Row numbers for one iteration: a slice of a per-epoch shuffle, so no prompt repeats within an
    iteration and any iteration's slice is computed directly (the data cursor is derived, not stored).
    When per_iteration does not divide the data, each epoch leaves out a different random remainder."""
    if per_iteration > n_prompts:
        raise ConfigError(
            f"data.prompts_per_iteration: {per_iteration} exceeds the {n_prompts} prompts in the data set; lower it"
        )
    per_epoch = n_prompts // per_iteration
    epoch, slot = divmod(iteration, per_epoch)
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_prompts)
    return [int(x) for x in perm[slot * per_iteration : (slot + 1) * per_iteration]]


def prompts_for_iteration(prompts: pl.DataFrame, cfg: Config, iteration: int) -> pl.DataFrame:
    idx = prompt_indices(prompts.height, cfg.data.prompts_per_iteration, cfg.run.seed, iteration)
    return prompts[idx]
