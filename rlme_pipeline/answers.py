"""Reference answers: the final answer a completion states, and whether it matches a dataset label.

Used where labels exist (audit, exact-match rewards); training on meta-evaluation never reads them.
The rule is deliberately plain so a user can predict it: the number after the last "The answer is",
else the last number in the text, else the text after "The answer is" up to the end of its sentence.
"""

from __future__ import annotations

import re

_NUMBER = r"-?\d+(?:[.,]\d+)*"
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)


def _normalise(s: str) -> str:
    s = s.strip().strip(".").strip()
    if re.fullmatch(_NUMBER, s):
        s = s.replace(",", "")  # 1,000 == 1000
        if "." in s:
            s = s.rstrip("0").rstrip(".")  # 6.0 == 6
    return s.lower()


def extract_answer(text: str | None) -> str | None:
    if not text:
        return None
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        tail = text[marks[-1].end():]
        m = re.match(_NUMBER, tail)
        if m:
            return _normalise(m.group())
        phrase = re.split(r"[.\n]", tail, maxsplit=1)[0]
        if phrase.strip():
            return _normalise(phrase)
    numbers = re.findall(_NUMBER, text)
    return _normalise(numbers[-1]) if numbers else None


def is_correct(completion: str | None, label: str | None) -> bool:
    """False when either side has no answer: an unanswered question is not correct."""
    got = extract_answer(completion)
    return got is not None and label is not None and got == _normalise(str(label))
