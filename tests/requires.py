"""Test dependencies fail loudly: a missing one is a broken environment, not a reason to pass or skip."""

from __future__ import annotations

import importlib.util

import pytest


def require(*modules: str) -> None:
    """Fail the calling test, naming the fix, when a module of the `dev` extra is not installed: a skipped
    or early-returning test reads as a pass in CI while checking nothing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: test dependencies are the `dev` extra "
            "(pip install -e '.[dev]', which `make test` does)",
            pytrace=False,
        )
