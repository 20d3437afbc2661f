"""Shared fixtures: offline tiny models built once per session, an isolated cache and Prefect home."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# Nothing in the test-suite may reach a hub, and no test may see a developer's caches or Prefect state.
# Set at import time: Prefect reads its settings (PREFECT_HOME) when it is first imported.
_SCRATCH = tempfile.mkdtemp(prefix="rlme-tests-")
os.environ.update(
    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_HOME=f"{_SCRATCH}/prefect", RLME_CACHE=f"{_SCRATCH}/rlme-cache", HF_DATASETS_CACHE=f"{_SCRATCH}/hf-datasets",
)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The demo's tiny policy and evaluator, built once into the session cache."""
    from rlme_pipeline.tiny import resolve_tiny

    return {"policy": resolve_tiny("policy"), "evaluator": resolve_tiny("evaluator")}


@pytest.fixture
def demo_cfg(tmp_path, tiny_models):
    """The demo config with storage in a temp dir and a small, fast size."""
    from rlme_pipeline.config import load_config

    return load_config(DEMO).with_overrides(storage=str(tmp_path / "runs"), iterations=3)


@pytest.fixture(autouse=True)
def _fresh_model_pool():
    """Models loaded by one test must not leak into the next (tests compare fresh runs)."""
    from rlme_pipeline.models import POOL

    POOL.clear()
    yield
    POOL.clear()
