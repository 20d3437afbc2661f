"""Generation and scoring backends behind one small contract.

A `Generator` turns token-id prompts and per-sample seeds into completions with per-token log-probs of
the temperature-scaled distribution; a `Judge` reads log P(positive) and log P(negative) at the position
after each (prefix, question) pair. Three implementations:

    hf      transformers in-process (backends/hf.py): the CPU default and the reference
    vllm    vllm.LLM in-process (backends/vllm.py): GPU hosts, `pip install rlme[vllm]`
    openai  any OpenAI-compatible completions server, external (URL) or managed (backends/openai.py,
            backends/server.py): vLLM in its own virtualenv, spoken to over HTTP

Every backend passes tests/backends/test_contract.py. This module imports neither torch nor vllm, so the
vLLM virtualenv can import `rlme_pipeline.backends.vllm` without the pipeline's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

STATUS_OK = "ok"
STATUS_CONTEXT_OVERFLOW = "context_overflow"
STATUS_NONFINITE = "nonfinite"
STATUS_BACKEND_ERROR = "backend_error"  # the request still failed after its retries: no number, never a 0


class BackendError(RuntimeError):
    """A backend could not produce what a stage needs (server gone, retries spent). The stage fails
    without writing its record, so running the iteration again resumes it."""


class BackendConfigError(BackendError, ValueError):
    """A backend setting that cannot work (no vLLM interpreter, an external server with other weights).
    A ValueError like every config problem: running the stage again cannot fix it, so it is not retried."""


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # log pi(y_t) at the sampling temperature, before top-p
    finish_reason: str  # "stop" | "length"


@dataclass
class Judgement:
    logp_yes: float | None
    logp_no: float | None
    status: str


class Generator(Protocol):
    def sample(
        self, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int, temperature: float, top_p: float
    ) -> list[Sample]:
        """One completion per (prompt, seed); the same (prompt, seed) gives the same sample in any batch.
        Temperature 0 is greedy decoding (held-out evaluation only; training samples)."""


class Judge(Protocol):
    max_positions: int

    def judge(
        self, prefixes: list[list[int]], questions: list[list[int]], yes_ids: list[int], no_ids: list[int]
    ) -> list[list[Judgement]]:
        """result[b][k]: log P(yes) and log P(no) after prefixes[b] + questions[k] (sums over variants)."""


def fitting_rows(
    prefixes: list[list[int]], questions: list[list[int]], max_positions: int
) -> tuple[list[list[Judgement]], list[int]]:
    """The one context rule every judge applies: a rollout whose prefix plus its longest question does not
    fit the evaluator's context is a `context_overflow` judgement for every question (never truncated,
    never a number). Returns results pre-filled with that status, and the rows that fit and must be run."""
    longest_q = max(len(q) for q in questions)
    results = [[Judgement(None, None, STATUS_CONTEXT_OVERFLOW)] * len(questions) for _ in prefixes]
    return results, [b for b, p in enumerate(prefixes) if len(p) + longest_q <= max_positions]


def logsumexp(xs: list[float]) -> float:
    import math

    m = max(xs)
    if not math.isfinite(m):
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))
