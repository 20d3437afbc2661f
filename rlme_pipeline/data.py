"""Prompts: loaded through Hugging Face `datasets`, and the deterministic slice each iteration trains on.

Where `data.path` (or `eval.path`) points, and how it is read (docs/data.md):
    a file (.jsonl/.json/.parquet/.csv)       its one split, train, as datasets names it
    a folder written by save_to_disk          load_from_disk: a DatasetDict's split, or the one Dataset
    any other folder (data files, README)     load_dataset(folder, config, split=...): splits from file names,
                                              configs from a README's `configs:`, as on the hub
    a glob (data/*.parquet)                   its files, one split, train
    a hub name (openai/gsm8k)                 load_dataset(name, config, split=..., revision=...)
Every problem is a ConfigError naming the field and the fix, raised before any model loads (preflight).
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import numpy as np
import polars as pl

from rlme_pipeline.config import Config, ConfigError, DataConfig

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GLOB = frozenset("*?[")
SINGLE_SPLIT = "train"  # what datasets calls the one split of a file, a glob or a saved Dataset without one


class Prompts:
    """The prompts of one training call, loaded on first use and kept by its holder (the runner): every
    iteration's generate stage and every eval ask for them, and a load through `datasets` costs ~0.5 s on a
    small CPU machine. An object, not module state: a new call (or a changed file) loads afresh."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._train: pl.DataFrame | None = None
        self._heldout: pl.DataFrame | None = None

    def train(self) -> pl.DataFrame:
        if self._train is None:
            self._train = load_prompts(self.cfg)
        return self._train

    def heldout(self) -> pl.DataFrame:
        if self._heldout is None:
            self._heldout = heldout_prompts(self.cfg)
        return self._heldout


def load_prompts(cfg: Config, data: DataConfig | None = None, field: str = "data") -> pl.DataFrame:
    """All prompts of `data` (default cfg.data) as (prompt_id, prompt, label), the prompt through
    data.prompt_template; columns are checked here, before any model loads; errors name `field`."""
    d = data or cfg.data
    path = _resolve(cfg, d.path)
    return _table(_dataset(d, path, field), d, path, field)


def heldout_prompts(cfg: Config) -> pl.DataFrame:
    """The held-out prompts of `eval` (its path, or data.path at eval.split), with data's columns and
    template; the first eval.prompts in a stable order of their ids (a hash, so not the file's order)."""
    e = cfg.eval
    # a path of its own comes with its own config/revision; data.path keeps data's, at the held-out split
    own = {"path": e.path, "config": e.config, "revision": e.revision} if e.path else {}
    data = cfg.data.model_copy(update={**own, "split": e.split or SINGLE_SPLIT})
    prompts = load_prompts(cfg, data, field="eval")
    key = [hashlib.sha256(f"eval/{p}".encode()).hexdigest() for p in prompts["prompt_id"]]
    return prompts.with_columns(_k=pl.Series(key, dtype=pl.String)).sort("_k").head(e.prompts).drop("_k")


def _resolve(cfg: Config, path: str) -> str:
    """cfg.resolve for paths and for globs: a relative glob is relative to the config file's folder when it
    matches there (as a relative path is), else to the working directory."""
    if not _GLOB & set(path) or Path(path).expanduser().is_absolute():
        return cfg.resolve(path)
    for base in (cfg._base_dir, Path.cwd()):
        if glob.glob(str(base / path)):
            return str(base / path)
    return path


def _dataset(d: DataConfig, path: str, field: str):
    """The `datasets.Dataset` that `path` names (module docstring), or a ConfigError naming the field."""
    p = Path(path).expanduser()
    if _GLOB & set(path):
        _local_only(d, field, path, "a glob")
        return _files(d, path, field, _glob_builder(path, field))
    if p.is_file():
        _local_only(d, field, path, "a file")
        if p.suffix.lower() not in _BUILDERS:
            raise ConfigError(
                f"{field}.path: {path!r} has an unsupported extension; use .jsonl, .json, .parquet or .csv"
            )
        return _files(d, path, field, _BUILDERS[p.suffix.lower()])
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            _local_only(d, field, path, "a save_to_disk folder")
            return _saved(d, path, field)
        if d.revision is not None:
            raise ConfigError(f"{field}.revision: {path!r} is a local folder, which has no revisions; remove it")
        return _builder(d, path, field, local=True)
    if path.startswith(("./", "../", "/", "~")) or p.suffix.lower() in _BUILDERS:
        raise ConfigError(
            f"{field}.path: {path!r} is not a file, folder or glob that exists (relative paths are relative to the "
            "config file's folder); give a local .jsonl/.json/.parquet/.csv file, a folder, a glob, or a hub data "
            "set name such as openai/gsm8k"
        )
    return _builder(d, path, field, local=False)


def _local_only(d: DataConfig, field: str, path: str, what: str) -> None:
    """A file, glob or saved data set has neither configurations nor revisions: a value there is a mistake."""
    for name in ("config", "revision"):
        if getattr(d, name) is not None:
            raise ConfigError(f"{field}.{name}: {path!r} is {what}, which has no {name}s; remove {field}.{name}")


def _glob_builder(path: str, field: str) -> str:
    """The datasets builder of a glob's files: one kind of data file, said by the glob's extension."""
    matches = sorted(glob.glob(path))
    if not matches:
        raise ConfigError(f"{field}.path: the glob {path!r} matches no file; check the pattern and the folder")
    kinds = {_BUILDERS.get(Path(m).suffix.lower()) for m in matches}
    if len(kinds) != 1 or None in kinds:
        found = sorted({Path(m).suffix or "(none)" for m in matches})
        raise ConfigError(
            f"{field}.path: the glob {path!r} matches files of kinds {found}; match one of .jsonl/.json, .parquet, "
            ".csv (e.g. end it in *.parquet)"
        )
    return kinds.pop()


def _files(d: DataConfig, path: str, field: str, builder: str):
    """A file or a glob of files: datasets reads them as one split, train."""
    import datasets  # heavy import, only where used

    try:
        return datasets.load_dataset(builder, data_files=path, split=d.split)
    except ValueError as e:  # an unknown split: files have one, "train"
        raise ConfigError(
            f"{field}.split: {d.split!r} cannot be read from {path}: a file or glob is one split, "
            f"{SINGLE_SPLIT!r} ({_one_line(e)})"
        ) from None


def _saved(d: DataConfig, path: str, field: str):
    """`save_to_disk` output: a DatasetDict's split, or a Dataset, whose split is the one it was saved with."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if d.split not in ds:
            raise ConfigError(f"{field}.split: {d.split!r} is not a split of {path}; its splits: {sorted(ds)}")
        return ds[d.split]
    own = str(ds.split) if ds.split is not None else SINGLE_SPLIT
    if d.split != own:
        raise ConfigError(
            f"{field}.split: {d.split!r} is not in {path}: it holds one data set, split {own!r}; set "
            f"{field}.split: {own}, or save a DatasetDict with the splits you need"
        )
    return ds


def _builder(d: DataConfig, path: str, field: str, local: bool):
    """A hub data set or a local folder of data files: datasets' own `load_dataset(path, config, split=...,
    revision=...)`, so configurations, split files and README metadata work as they do on the hub."""
    import datasets

    try:
        return datasets.load_dataset(path, d.config, split=d.split, revision=d.revision)
    except Exception as e:  # datasets raises many types for "not found" / offline
        why = _one_line(e)
        if message := _choice_error(d, path, field, why):
            raise ConfigError(message) from None
        if local:
            raise ConfigError(
                f"{field}.path: the folder {path!r} could not be read as a data set ({type(e).__name__}: {why}); it "
                "should hold .parquet/.jsonl/.json/.csv files (split by name, e.g. train-0.parquet, "
                "test-0.parquet) or be datasets.save_to_disk output"
            ) from None
        raise ConfigError(_unreachable(d, path, field, e)) from None


def _choice_error(d: DataConfig, path: str, field: str, why: str) -> str | None:
    """A data set that exists read with a configuration or split it lacks, said as the field to change."""
    if "Config name is missing" in why:
        return f"{field}.config: {path} has several configurations; name one ({why})"
    if "BuilderConfig" in why and "not found" in why:
        return f"{field}.config: {d.config!r} is not a configuration of {path} ({why})"
    if "Unknown split" in why or "Bad split" in why:
        return f"{field}.split: {d.split!r} is not a split of {path} ({why})"
    return None


def _unreachable(d: DataConfig, path: str, field: str, e: Exception) -> str:
    import os

    offline = " (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: the hub is not asked)" if _offline(os.environ) else ""
    rev = f" at revision {d.revision!r}" if d.revision else ""
    return (
        f"{field}.path: {path!r} is neither a local file, folder or glob nor a hub data set that could be "
        f"loaded{rev}{offline} ({type(e).__name__}: {_one_line(e)}). Give a local path, or check the name, "
        f"{field}.config, {field}.revision and the network"
    )


def _offline(env) -> bool:
    return any(env.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _table(ds, d: DataConfig, path: str, field: str) -> pl.DataFrame:
    """(prompt_id, prompt, label) from a loaded data set, after checking its columns."""
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
        {"prompt_id": ids, "prompt": [d.templated(str(p)) for p in ds[d.prompt_column]], "label": labels},
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
