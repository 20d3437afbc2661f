"""Reference answers: the final answer a completion states, and whether it matches a dataset label.

Used where labels exist (audit, exact-match rewards); training on meta-evaluation never reads them.
Extractors, all returning a normalised answer (numbers by value: "1,000.0" == "1000"; text lower-cased):
    answer_is    the number after the last "The answer is" (strict: the format the task asks for)
    boxed        the content of the last \\boxed{...}
    last_number  the last number in the text
    auto         answer_is, else the phrase after the last "The answer is", else boxed, else last_number
"""

from __future__ import annotations

import re

EXTRACTORS = ("auto", "answer_is", "boxed", "last_number")
_NUMBER = r"-?\d+(?:[.,]\d+)*"
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*\$?", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize(answer: str) -> str:
    s = answer.strip().strip(".").strip()
    if re.fullmatch(_NUMBER, s):
        s = s.replace(",", "")  # 1,000 == 1000
        if "." in s:
            s = s.rstrip("0").rstrip(".")  # 6.0 == 6
    return s.lower()


def _after_answer_is(text: str) -> str | None:
    marks = list(_ANSWER_IS.finditer(text))
    return text[marks[-1].end() :] if marks else None


def extract_answer(text: str | None, extractor: str = "auto") -> str | None:
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown answer extractor {extractor!r}; valid: {', '.join(EXTRACTORS)}")
    if not text:
        return None
    tail = _after_answer_is(text)
    if extractor in ("auto", "answer_is") and tail is not None:
        if m := re.match(_NUMBER, tail):
            return normalize(m.group())
        if extractor == "auto" and (phrase := re.split(r"[.\n]", tail, maxsplit=1)[0]).strip():
            return normalize(phrase)
    if extractor in ("auto", "boxed") and (boxed := _BOXED.findall(text)):
        return normalize(boxed[-1])
    if extractor in ("auto", "last_number") and (numbers := re.findall(_NUMBER, text)):
        return normalize(numbers[-1])
    return None


def is_correct(completion: str | None, label: str | None, extractor: str = "auto") -> bool:
    """False when either side has no answer: an unanswered question is not correct."""
    got = extract_answer(completion, extractor)
    return got is not None and label is not None and got == normalize(str(label))
