"""Loading a config from a local path or any fsspec URL (a worker may get `s3://.../train.yaml`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec

from rlme_pipeline.config import Config, load_config


def load(config_uri: str, **run_overrides) -> Config:
    if "://" in config_uri and not config_uri.startswith("file://"):
        with fsspec.open(config_uri, "rb") as f, tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(config_uri).name
            local.write_bytes(f.read())
            cfg = load_config(local)
    else:
        cfg = load_config(config_uri.removeprefix("file://"))
    return cfg.with_overrides(**run_overrides)


def public_options(options: dict | None, flag: str = "storage_options") -> dict:
    """Storage options given to a command or flow run: Prefect records flow parameters and the run may
    copy them, so a key that looks like a credential is refused (credentials come from the environment)."""
    from rlme_pipeline.storage.store import secret_option_keys

    options = dict(options or {})
    if bad := secret_option_keys(options):
        raise ValueError(
            f"{flag} {bad}: pass credentials through the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
            "...), never as an option: options are recorded"
        )
    return options
