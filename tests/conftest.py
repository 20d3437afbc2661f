"""Shared fixtures: offline tiny models built once per session, the real SmolLM2 imported once per session, an
isolated cache and Prefect home."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# Real pretrained models, fetched by `make real-models` (which `make test` runs first); never downloaded here.
REAL_MODELS = Path(os.environ.get("RLME_REAL_MODELS", ROOT / ".cache" / "real-models"))
SMOLLM2_GGUF = REAL_MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Nothing in the test-suite may reach a hub, and no test may see a developer's caches or Prefect state.
# Set at import time: Prefect reads its settings (PREFECT_HOME) when it is first imported.
_SCRATCH = tempfile.mkdtemp(prefix="rlme-tests-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_HOME=f"{_SCRATCH}/prefect",
    RLME_CACHE=f"{_SCRATCH}/rlme-cache",
    HF_DATASETS_CACHE=f"{_SCRATCH}/hf-datasets",
)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The demo's tiny policy and evaluator, built once into the session cache."""
    from rlme_pipeline.models.tiny import resolve_tiny

    return {"policy": resolve_tiny("policy"), "evaluator": resolve_tiny("evaluator")}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as the GGUF file `make real-models` fetched (98 MB, Q4_1). Missing, the test
    fails naming the fix: a skipped test would read as a pass in CI while checking nothing."""
    from tests.requires import require

    require("gguf")
    if not SMOLLM2_GGUF.is_file():
        pytest.fail(
            f"{SMOLLM2_GGUF} is missing: run `make real-models` (`make test` does; RLME_REAL_MODELS moves it)",
            pytrace=False,
        )
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct (134.5M parameters, 49,152-token vocabulary, a chat template) as an ordinary HF
    directory: imported once per session into the session's cache (15-40 s of GGUF de-quantisation on a
    2-core CPU), so `gguf:{smollm2_gguf}` references in the same session resolve to it at no cost."""
    from rlme_pipeline.models.importing import import_model

    return import_model(f"gguf:{smollm2_gguf}")


def demo_dict() -> dict:
    """configs/demo.yaml as a dict, its data files made absolute, for tests that write a variant of it
    elsewhere (the relative paths in the file are relative to configs/)."""
    import yaml

    d = yaml.safe_load(DEMO.read_text())
    d["data"]["path"] = str((DEMO.parent / d["data"]["path"]).resolve())
    if (d.get("eval") or {}).get("path"):
        d["eval"]["path"] = str((DEMO.parent / d["eval"]["path"]).resolve())
    return d


def demo_variant(
    storage: str | Path | None = None,
    *,
    iterations: int | None = None,
    run_id: str | None = None,
    micro: bool = False,
    **sections,
) -> dict:
    """The one way a test changes the demo: configs/demo.yaml as a dict (demo_dict), with `storage`,
    `iterations`, `run_id` set in its run section; `micro`, the smallest run that still trains (2 prompts x
    2 samples of 8 tokens, one judge, one question, no held-out eval: seconds an iteration); then each
    keyword a section: a dict of fields merged into it, None to remove it, anything else to replace it."""
    d = demo_dict()
    run = {"storage": str(storage) if storage is not None else None, "iterations": iterations, "id": run_id}
    d["run"].update({k: v for k, v in run.items() if v is not None})
    if micro:
        d["data"].update(prompts_per_iteration=2)
        d["evaluators"], d["questions"] = d["evaluators"][:1], d["questions"][:1]
        d["generation"].update(group_size=2, max_new_tokens=8)
        d.pop("eval", None)
    for section, fields in sections.items():
        if fields is None:
            d.pop(section, None)
        elif isinstance(fields, dict) and isinstance(d.get(section), dict):
            d[section] = {**d[section], **fields}
        else:
            d[section] = fields
    return d


# The demo's training settings as the evolve and phase tests pin them (4 samples a prompt, one small step
# an iteration, the probe every iteration, no held-out eval), so that tuning the demo does not move them.
PINNED = {
    "generation": {"group_size": 4},
    "optimizer": {"lr": 1.0e-4, "epochs": 1, "micro_batch_size": 8, "grad_accumulation": 4},
    "probe": {"every": 1},
    "eval": None,
}


def write_config(d: dict, folder: Path, name: str = "config") -> Path:
    """A config dict as the YAML file a user would pass to `rlme train`."""
    import yaml

    path = Path(folder) / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def trained_demo(root: Path, **variant):
    """A demo variant (demo_variant's arguments; storage under root) trained in this process: the run a
    module's fixture trains once and its tests copy (copy_run)."""
    from rlme_pipeline.config import validate_config
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.storage.run import Run

    cfg = validate_config(demo_variant(Path(root) / "runs", **variant))
    run = Run.for_config(cfg)
    train(cfg, run)
    return run


def copy_run(src, tmp_path: Path):
    """A copy of a trained run under tmp_path/runs, for a test that changes it."""
    from rlme_pipeline.storage.run import Run

    dst = Path(tmp_path) / "runs" / src.id
    shutil.copytree(src.store.root, dst)
    return Run.from_url(str(dst))


@pytest.fixture(scope="module")
def prefect_server():
    """A real Prefect server (Prefect's test harness: a temporary database and API) for one module; the
    flows a test runs report to it. Its URL, while it runs."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def demo_cfg(tmp_path, tiny_models):
    """The demo config with storage in a temp dir and a small, fast size."""
    from rlme_pipeline.config import load_config

    return load_config(DEMO).with_overrides(storage=str(tmp_path / "runs"), iterations=3)


@pytest.fixture
def backends():
    """Models and servers for one test, closed after it: nothing loaded by one test leaks into the next."""
    from rlme_pipeline.backends.session import Backends

    with Backends() as b:
        yield b


# --- a real S3 endpoint ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint, as s3fs's own test-suite uses)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3Bucket:
    name: str
    endpoint: str
    env: dict  # what a user exports: credentials, endpoint, region
    fs: object  # an s3fs filesystem for checks from the test side

    def url(self, prefix: str = "runs") -> str:
        return f"s3://{self.name}/{prefix}"


@pytest.fixture
def s3(moto_endpoint, monkeypatch) -> S3Bucket:
    """A fresh bucket, reached through s3fs exactly as a user's bucket would be: credentials, endpoint and
    region from the standard AWS_* environment variables. The secret key is unique per test, so a test can
    prove that it appears nowhere a run writes."""
    import s3fs

    env = {
        "AWS_ACCESS_KEY_ID": "rlme-test-access-key",
        "AWS_SECRET_ACCESS_KEY": f"rlme-secret-{uuid.uuid4().hex}",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    # fsspec caches filesystems by their options, not by the environment: one made while another test's
    # endpoint was exported would still point there
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    name = f"rlme-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return S3Bucket(name, moto_endpoint, env, fs)


@pytest.fixture
def micro_config(tmp_path, tiny_models):
    """Write a YAML config small enough to train in seconds (demo_variant's `micro`), for tests that run
    training in a subprocess. Returns a function(storage, iterations, run_id, **run fields) -> path."""

    def make(storage: str, iterations: int = 2, run_id: str = "micro", **run_fields) -> Path:
        d = demo_variant(storage, iterations=iterations, run_id=run_id, micro=True)
        d["run"].update(run_fields)
        return write_config(d, tmp_path, run_id)

    return make
