"""Answer extraction and normalisation, case by case: which answer each extractor reads from a text,
and which spellings of a number or a phrase compare equal."""

from __future__ import annotations

import pytest

from rlme_pipeline.algorithm.answers import FORMATS, extract_answer, is_correct, normalize


@pytest.mark.parametrize(
    "raw,want",
    [
        (" 42. ", "42"),
        ("1,000.50", "1000.5"),
        ("10.0", "10"),
        ("100", "100"),
        ("-0.50", "-0.5"),
        ("7.", "7"),
        ("Paris", "paris"),
        (" New York. ", "new york"),
        ("Xavier.", "xavier"),
        ("1,5 apples", "1,5 apples"),
        ("3.10", "3.1"),
    ],
)
def test_normalize(raw, want):
    assert normalize(raw) == want


@pytest.mark.parametrize(
    "text,extractor,want",
    [
        ("The answer is: $12 dollars", "answer_is", "12"),
        ("the final answer is 7", "answer_is", "7"),
        ("THE ANSWER IS\n 8", "auto", "8"),
        ("The answer is 3, then the answer is 9.", "auto", "9"),  # the last statement counts
        ("The answer is Paris\nbecause it is", "auto", "paris"),  # a phrase ends at the line
        ("The answer is blue. Or red.", "auto", "blue"),  # or at the sentence
        ("The answer is . so \\boxed{3}", "auto", "3"),  # an empty phrase falls through to the box
        ("The answer is x. \\boxed{3}", "answer_is", None),  # strict: no number after the phrase
        ("The answer is x. \\boxed{3}", "auto", "x"),
        ("\\boxed{12} 40", "auto", "12"),
        ("no box but 4 and 5", "auto", "5"),
        ("x = -3.50", "last_number", "-3.5"),
        ("The answer is 6", "boxed", None),
        ("The answer is 6", "last_number", "6"),
        ("", "auto", None),
        (None, "auto", None),
    ],
)
def test_extract_answer(text, extractor, want):
    assert extract_answer(text, extractor) == want


def test_unknown_format_names_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"^unknown answer format 'regex'; valid: auto, gsm8k, math, answer_is, boxed, last_number$"
    ):
        extract_answer("The answer is 5", "regex")
    assert FORMATS == ("auto", "gsm8k", "math", "answer_is", "boxed", "last_number")


def test_is_correct():
    assert is_correct("The answer is 5", 5)  # a numeric label compares by its text
    assert is_correct("The answer is 1,000.", "1000.00")
    assert is_correct("The answer is Paris.", " PARIS ")
    assert not is_correct("no answer here", "5")
    assert not is_correct("The answer is 5", None)
    assert not is_correct(None, "5")
    assert is_correct("\\boxed{5} but the answer is 6", "5", "boxed") and not is_correct(
        "\\boxed{5} but the answer is 6", "5"
    )
