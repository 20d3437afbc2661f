"""Answer extraction and exact-match checking for rule-based (label) rewards.

Kept deliberately small: three extractors that cover the usual answer formats. Numbers compare by
value ("38", "38.0" and "38." all match 38; "1,234" matches 1234), other strings by trimmed text.
"""

from __future__ import annotations

import re

EXTRACTORS = ("answer_is", "boxed", "last_number")
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is:?\s*\$?(" + _NUMBER + ")")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANY_NUMBER = re.compile(_NUMBER)


def extract_answer(text: str, extractor: str = "answer_is") -> str | None:
    """The answer in `text` by the named extractor, or None if it has none (the last match wins)."""
    if extractor == "answer_is":
        found = _ANSWER_IS.findall(text)
    elif extractor == "boxed":
        found = _BOXED.findall(text)
    elif extractor == "last_number":
        found = _ANY_NUMBER.findall(text)
    else:
        raise ValueError(f"unknown answer extractor {extractor!r}; valid: {', '.join(EXTRACTORS)}")
    return found[-1].strip() if found else None


def normalize(answer: str) -> str:
    """Canonical form: numbers by value (commas dropped, trailing zeros removed), else stripped text."""
    s = answer.strip().rstrip(".").replace(",", "")
    try:
        v = float(s)
    except ValueError:
        return answer.strip()
    return str(int(v)) if v.is_integer() else repr(v)


def is_correct(completion: str, label: str | None, extractor: str = "answer_is") -> bool:
    """Exact match of the extracted answer against the label; no answer or no label is not correct."""
    if label is None:
        return False
    got = extract_answer(completion, extractor)
    return got is not None and normalize(got) == normalize(str(label))
