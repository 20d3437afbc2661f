"""Reference answers: the final answer a completion states, and whether it matches a dataset label.

Used where labels exist (the label reward, eval accuracy and pass@k / maj@k, the audit's label AUROC, evolve's
AUROC gate), all with the one format of the run (config `answers.format`, `Config.answer_format`); training
on meta-evaluation never reads them. Formats:
    gsm8k        the number after the last "####", else after the last "The answer is", else the last number;
                 numbers compare by value ("$1,000.00" == "1000"; units and "%" after the number are dropped)
    math         the content of the last \\boxed{...} or \\fbox{...} (nested braces), else the phrase after the
                 last "The answer is", else the last number; compared with math-verify (\\dfrac{14}{3} ==
                 \\frac{14}{3} == 4\\frac{2}{3}, 4.5 == \\frac{9}{2}, x=3 == 3)
    answer_is    the number after the last "The answer is" (strict: the format the task asks for)
    boxed        the content of the last \\boxed{...} or \\fbox{...}
    last_number  the last number in the text
    auto         "####", else answer_is, else the phrase after the last "The answer is", else boxed, else
                 last_number
Every format but `math` compares normalised text: numbers by value, anything else lower-cased.
A label is read the same way whatever the format: the text after its last "####" (a GSM8K solution), else
its last \\boxed{} (a MATH solution), else the whole label.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from decimal import Decimal

FORMATS = ("auto", "gsm8k", "math", "answer_is", "boxed", "last_number")
# a number as written: optional minus, digits with optional thousands commas (1,000,000) and decimals, or .5
_NUMBER = r"-?(?:(?:\d{1,3}(?:,\d{3})+(?!,?\d)|\d+)(?:\.\d+)?|\.\d+)"
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*\\?\$?", re.IGNORECASE)
_HASHES = "####"
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An answer longer than this is not handed to math-verify: no MATH answer is, and sympy can take minutes on an
# adversarial one where no timeout can run (math-verify's alarm needs the main thread; Prefect tasks and polars
# UDFs run in others). For the same reason neither is an answer whose value explodes when sympy evaluates it:
# a power tower (10^{10^{10}}), an exponent of 6+ digits, a factorial of a power or of a 6+ digit number.
MATH_VERIFY_MAX_CHARS = 500
_EXPLOSIVE = re.compile(
    r"\^\s*\{[^{}]*\^|\^\s*\d+\s*\^"  # a tower: a power inside an exponent
    r"|\^\s*\{?\s*-?\d{6,}"  # an exponent of 6+ digits
    r"|\}\s*!|\([^()]*(?:\^|\d{4,})[^()]*\)\s*!|\d{6,}\s*!"  # a factorial of a power, a big group or number
)


def canonical_number(s: str) -> str:
    """A number as one spelling of its value: commas dropped, trailing zeros dropped, -0 is 0 ("1,000.50" ->
    "1000.5", ".5" -> "0.5"), so numbers that are equal compare equal as text."""
    d = Decimal(s.replace(",", ""))
    text = format(d.normalize(), "f")
    return "0" if d == 0 else text


def normalize(answer: str) -> str:
    """An extracted answer as compared: a number (with an optional "$" before or "%" after it) by value,
    anything else stripped of a trailing period and lower-cased."""
    s = answer.strip().rstrip(".").strip()
    if m := re.fullmatch(rf"\\?\$?\s*({_NUMBER})\s*\\?%?", s):
        return canonical_number(m.group(1))
    return s.lower()


def boxed(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...} in order, with nested braces (\\boxed{\\frac{14}{3}});
    an unclosed box ends the search."""
    out, pos = [], 0
    while m := _BOX.search(text, pos):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            break
        out.append(text[m.end() : i - 1])
        pos = i
    return out


def _tail(text: str, marker: re.Pattern | str) -> str | None:
    """The text after the last `marker`, or None without one."""
    if isinstance(marker, str):
        at = text.rfind(marker)
        return None if at < 0 else text[at + len(marker) :]
    marks = list(marker.finditer(text))
    return text[marks[-1].end() :] if marks else None


def _leading_number(tail: str | None) -> str | None:
    """The number a tail starts with ("$" and spaces allowed before it), as `normalize` spells it."""
    if tail is not None and (m := re.match(rf"\s*\\?\$?\s*({_NUMBER})", tail)):
        return canonical_number(m.group(1))
    return None


def _first_number(tail: str | None) -> str | None:
    if tail is not None and (m := re.search(_NUMBER, tail)):
        return canonical_number(m.group())
    return None


def _last_number(text: str) -> str | None:
    numbers = re.findall(_NUMBER, text)
    return canonical_number(numbers[-1]) if numbers else None


def _phrase(tail: str | None) -> str | None:
    """The phrase after "The answer is": up to the end of its line or sentence; None when empty."""
    if tail is None:
        return None
    phrase = re.split(r"\.(?!\d)|\n", tail, maxsplit=1)[0].strip()
    return phrase or None


def _math_phrase(tail: str | None) -> str | None:
    """`_phrase` for LaTeX: the line, without the $ delimiters or a final period."""
    if tail is None:
        return None
    line = tail.split("\n", 1)[0].strip().rstrip(".").strip().strip("$").strip()
    return line or None


def _extract_math(text: str) -> str | None:
    """The LaTeX answer, as written (math-verify compares it): last box, then "The answer is", then a number."""
    if boxes := boxed(text):
        return boxes[-1].strip() or None
    return _math_phrase(_tail(text, _ANSWER_IS)) or _last_number(text)


def extract_answer(text: str | None, fmt: str = "auto") -> str | None:
    """The answer `text` states under format `fmt`, normalised (`math`: as written); None when it states none."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown answer format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not text:
        return None
    if fmt == "math":
        return _extract_math(text)
    after_is = _tail(text, _ANSWER_IS)
    if fmt in ("auto", "gsm8k") and (n := _first_number(_tail(text, _HASHES))) is not None:
        return n
    if fmt in ("auto", "answer_is", "gsm8k") and (n := _leading_number(after_is)) is not None:
        return n
    if fmt == "auto" and (phrase := _phrase(after_is)) is not None:
        return normalize(phrase)
    if fmt in ("auto", "boxed") and (boxes := boxed(text)):
        return normalize(boxes[-1]) or None
    if fmt in ("auto", "last_number", "gsm8k"):
        return _last_number(text)
    return None


def reference_answer(label: str | int | float | None, fmt: str = "auto") -> str | None:
    """The answer a label holds: after its last "####" (GSM8K), else its last box (MATH), else all of it;
    normalised as `fmt` compares (gsm8k: its first number)."""
    if label is None:
        return None
    text = str(label)
    if (after := _tail(text, _HASHES)) is not None:
        text = after
    elif boxes := boxed(text):
        text = boxes[-1]
    if fmt == "math":
        return text.strip() or None
    if fmt == "gsm8k" and (n := _first_number(text)) is not None:
        return n
    return normalize(text) or None


def same_answer(got: str | None, reference: str | None, fmt: str) -> bool:
    """Whether an extracted answer equals a reference answer (both as `extract_answer`/`reference_answer`
    give them): by math-verify for `math`, as normalised text otherwise. None on either side is not equal."""
    if got is None or reference is None:
        return False
    if fmt == "math":
        return math_equal(reference, got)
    return got == reference


def is_correct(completion: str | None, label: str | int | float | None, fmt: str = "auto") -> bool:
    """False when either side has no answer: an unanswered question is not correct."""
    return same_answer(extract_answer(completion, fmt), reference_answer(label, fmt), fmt)


def math_equal(gold: str, pred: str) -> bool:
    """math-verify's equivalence of two LaTeX answers (gold first: it is not symmetric for equations).
    Each is parsed as the content of a box, the way MATH states answers. Equal text is equal without a
    parse; an answer over MATH_VERIFY_MAX_CHARS, or one whose value would explode (_EXPLOSIVE), is compared
    as text only."""
    if _light(gold) == _light(pred):
        return True
    if max(len(gold), len(pred)) > MATH_VERIFY_MAX_CHARS or _EXPLOSIVE.search(gold + " " + pred):
        return False
    from math_verify import parse, verify  # imports sympy: only where MATH answers are compared

    # math-verify times out with SIGALRM, which only the main thread may set (Prefect runs tasks in threads)
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=limit)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=limit)
    return bool(verify(g, p, timeout_seconds=limit))  # False when either parse found nothing


def _light(s: str) -> str:
    """The spelling differences that need no parse: spaces, \\dfrac / \\tfrac, \\left / \\right."""
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return re.sub(r"\\(?:left|right)(?![A-Za-z])|\s+", "", s)


def majority(answers: Sequence[str | None], fmt: str) -> str | None:
    """The answer most samples give (maj@k), or None when none gives one. Unanswered samples do not vote;
    answers that are the same (`same_answer`'s rule, so \\dfrac{1}{2} and 0.5 are one vote under `math`)
    count together; a tie goes to the answer given first, so the vote depends on the samples alone."""
    groups: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if same_answer(a, g[0], fmt):
                g.append(a)
                break
        else:
            groups.append([a])
    return max(groups, key=len)[0] if groups else None
