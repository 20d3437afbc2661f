"""Seeds and ids derived from names, so any piece of a run can be recomputed in isolation."""

from __future__ import annotations

import hashlib


def derive(*parts) -> int:
    """A 63-bit seed from (run seed, iteration, prompt id, sample index, ...)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def rollout_id(run_id: str, iteration: int, prompt_id: str, sample_index: int) -> str:
    return hashlib.sha256(f"{run_id}/{iteration}/{prompt_id}/{sample_index}".encode()).hexdigest()[:24]
