"""GSM8K and MATH answers, case by case (hand-written in each data set's own style): what each format reads
off a completion and off a label, and which answers are the same. MATH equivalence is the real math-verify.
Each case pins a boundary that a wrong rule (a planted bug) crosses; the comments say which."""

from __future__ import annotations

import threading

import pytest

from rlme_pipeline.algorithm.answers import (
    MATH_VERIFY_MAX_CHARS,
    boxed,
    canonical_number,
    extract_answer,
    is_correct,
    majority,
    math_equal,
    normalize,
    reference_answer,
    same_answer,
)

# A GSM8K label: the worked solution, calculator annotations, and the answer after "####".
NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
MILLION = "The prize is 10 * 100,000 = <<10*100000=1000000>>1,000,000 dollars.\n#### 1000000"
# A MATH label as the `solution` column has it: the answer in the last box, nested braces inside.
SOLUTION = r"We have $x = \frac{28}{6}$, so the answer is $\boxed{\frac{14}{3}}$."


@pytest.mark.parametrize(
    "label,fmt,want",
    [
        (NATALIA, "gsm8k", "72"),  # after "####", not the 24 or 48 of the worked solution
        (NATALIA, "auto", "72"),  # every format reads a GSM8K label the same way
        (NATALIA, "answer_is", "72"),
        ("#### 1,000", "gsm8k", "1000"),
        ("#### -5", "gsm8k", "-5"),
        ("#### 0.50", "gsm8k", "0.5"),
        ("#### 72 dollars", "gsm8k", "72"),  # gsm8k: the number, not its unit
        ("#### 72 dollars", "auto", "72 dollars"),  # other formats compare the text
        ("#### 5\nlater #### 6", "gsm8k", "6"),  # the last marker
        (SOLUTION, "math", r"\frac{14}{3}"),  # the last box, nested braces whole
        (SOLUTION, "boxed", r"\frac{14}{3}"),
        (r"\frac{14}{3}", "math", r"\frac{14}{3}"),  # MATH-500's `answer` column: the bare answer
        (r" \boxed{1} then \fbox{2} ", "auto", "2"),
        (" PARIS. ", "auto", "paris"),
        (5, "auto", "5"),  # a numeric label compares by its text
        (2.50, "gsm8k", "2.5"),
        ("", "auto", None),
        ("#### ", "gsm8k", None),  # a marker with nothing after it holds no answer
        ("  ", "math", None),
        (None, "math", None),
        (r"\boxed{\text{(A)}, 1,000}", "math", r"\text{(A)}, 1,000"),  # math: as written, not lower-cased
    ],
)
def test_reference_answer(label, fmt, want):
    assert reference_answer(label, fmt) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("Natalia sold 24 + 48 = 72 clips.\n#### 72", "72"),
        ("#### $1,000,000", "1000000"),  # "$" and thousands commas
        ("So she has #### 72 dollars.", "72"),  # a unit and a period after the number
        ("#### 72 cm", "72"),
        ("#### 72.00", "72"),  # trailing zeros
        ("#### .5", "0.5"),  # a decimal without its leading zero
        ("#### -3", "-3"),  # the sign is kept
        ("#### 50%", "50"),  # percent after the number
        ("#### 7\nI hope this helps; step 3 was the hard one.", "7"),  # the marker beats the last number
        ("#### 5\n#### 6", "6"),  # the last marker
        ("The answer is 12. Then 3 more steps.", "12"),  # no marker: "The answer is"
        ("I count 5 apples and 7 pears", "7"),  # neither: the last number
        ("3 cats #### none", "3"),  # a marker without a number falls back
        ("costs 1,000, then 2,000.", "2000"),  # a comma after a group ends the number
        ("#### 1,0000", "1"),  # not a grouped number: "1", then "0000" (not 1,000 and a stray 0)
        ("no digits", None),
        ("", None),
    ],
)
def test_gsm8k_completions(text, want):
    assert extract_answer(text, "gsm8k") == want


@pytest.mark.parametrize(
    "completion,label,correct",
    [
        ("The answer is 72.", NATALIA, True),  # the case: every format reads the label's "####"
        ("#### 72", NATALIA, True),
        ("#### 73", NATALIA, False),
        ("#### 1,000,000", MILLION, True),
        ("#### $1000000.00", MILLION, True),
        ("#### 100000", MILLION, False),
        ("#### 0.50", "#### .5", True),  # by value
        ("#### 0.5", "#### 5", False),
        ("#### -72", NATALIA, False),  # a negative is another number
        ("#### 72 dollars.", NATALIA, True),
        ("#### 72", "#### 72 dollars", True),  # the label is read as gsm8k too: its number, not its unit
        ("#### 72%", NATALIA, True),
        ("no answer at all", NATALIA, False),
        ("#### 72", None, False),  # no label: not correct
        (None, NATALIA, False),
    ],
)
def test_gsm8k_correctness(completion, label, correct):
    assert is_correct(completion, label, "gsm8k") is correct


@pytest.mark.parametrize(
    "fmt,text,want",
    [
        ("auto", "so #### 72", "72"),  # auto reads a GSM8K-style completion too
        ("auto", "The answer is 3. #### 5", "5"),  # the marker first
        ("auto", r"\boxed{\frac{14}{3}}", r"\frac{14}{3}"),  # not the 3 at its end
        ("boxed", r"\boxed{\frac{14}{3}}", r"\frac{14}{3}"),  # nested braces
        ("boxed", r"\fbox{12}", "12"),
        ("boxed", r"\boxed{1} and \boxed{2}", "2"),  # the last box
        ("boxed", r"\boxed {5}", "5"),
        ("boxed", r"\boxed{}", None),  # an empty box states nothing
        ("boxed", r"\boxed{3", None),  # an unclosed box is no box
        ("boxed", r"\boxed{1} \boxed{2", "1"),  # an unclosed last box leaves the closed one
        ("answer_is", "#### 5", None),  # strict formats do not read the marker
        ("answer_is", "The answer is $-4.", "-4"),
        ("answer_is", r"The answer is \$7", "7"),
        ("last_number", "#### 5 then 6", "6"),
        ("math", r"first \boxed{1}, finally \boxed{\dfrac{14}{3}}.", r"\dfrac{14}{3}"),  # as written
        ("math", r"The answer is $\frac{1}{2}$.", r"\frac{1}{2}"),  # no box: the stated phrase
        ("math", r"The answer is $2 \sqrt{3}$.", r"2 \sqrt{3}"),  # the whole line, spaces and all
        ("math", "The answer is 10X.\nCheck:\n10X = 10X", "10X"),  # the first line; only its period goes
        ("math", "I get 4 and then 9", "9"),  # neither: the last number
        ("math", r"\boxed{3", "3"),  # an unclosed box: the last number
        ("math", r"\boxed{ }", None),
        ("math", "no answer", None),
    ],
)
def test_extract_by_format(fmt, text, want):
    assert extract_answer(text, fmt) == want


@pytest.mark.parametrize(
    "completion,label,correct",
    [
        (r"\boxed{\frac{14}{3}}", SOLUTION, True),
        (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),  # \dfrac is \frac
        (r"\boxed{4\frac{2}{3}}", r"\frac{14}{3}", True),  # math-verify reads a mixed number (MATH's usage)
        (r"\boxed{\frac{13}{3}}", r"\frac{14}{3}", False),
        (r"\boxed{4.5}", r"\frac{9}{2}", True),  # a decimal equals its fraction
        (r"\boxed{4.51}", r"\frac{9}{2}", False),
        (r"\boxed{x=3}", "3", True),  # an equation's value
        (r"\boxed{3}", "x=3", True),
        (r"\boxed{x=4}", "3", False),
        (r"\boxed{50\%}", "50", True),  # math-verify: a percent equals its number
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})", True),
        (r"\boxed{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", False),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", True),  # symbolic equality
        (r"\fbox{7}", "7", True),
        (r"\boxed{1} wait, \boxed{2}", "1", False),  # the last box is the answer
        (r"\boxed{-1}", "1", False),
        ("The answer is 72.", "#### 72", True),  # math reads GSM8K labels too
        ("no answer", "3", False),
        (r"\boxed{3}", None, False),
    ],
)
def test_math_correctness(completion, label, correct):
    assert is_correct(completion, label, "math") is correct


def test_legacy_formats_compare_text_not_math():
    """Only `math` asks math-verify: under `boxed` a fraction and its decimal are different answers."""
    assert not is_correct(r"\boxed{4.5}", r"\frac{9}{2}", "boxed")
    assert is_correct(r"\boxed{4.50}", "4.5", "boxed")  # numbers still compare by value
    assert is_correct(r"\boxed{\frac{14}{3}}", SOLUTION, "boxed")


def test_math_verify_is_skipped_past_the_length_limit():
    """Equal values spelt with leading zeros: at the limit math-verify decides; one past it, only text."""
    at = "0" * (MATH_VERIFY_MAX_CHARS - 2) + "12"
    assert len(at) == MATH_VERIFY_MAX_CHARS and math_equal("12", at)
    assert not math_equal("12", "0" + at)
    assert not math_equal("0" + at, "12")  # the limit holds for the gold side too
    assert math_equal("0" + at, "0" + at)  # equal text needs no parse


@pytest.mark.parametrize(
    "explosive",
    [r"9^{9^{9^{9}}}", r"10^{10^{10}}", "2^3^4", r"10^{1000000}", r"(10^{100})!", r"10^{10}!", "1000000!", "(12345)!"],
)
def test_answers_whose_value_explodes_are_compared_as_text_at_once(explosive):
    """sympy would take the whole timeout (5 s) on these in the main thread, and forever in a worker thread,
    where there is none: they never reach math-verify. Equal text is still equal."""
    done = []
    t = threading.Thread(target=lambda: done.append((math_equal("3", explosive), math_equal(explosive, explosive))))
    t.start()
    t.join(timeout=2)
    assert done == [(False, True)], "math-verify was asked"


TOWER = r"10^{10^{10}}"  # never parsed: what is equal here is equal as text (`_light`)


@pytest.mark.parametrize(
    "gold,pred,equal",
    [
        (rf"\frac{{{TOWER}}}{{2}}", rf"\dfrac{{{TOWER}}}{{2}}", True),  # \dfrac and \tfrac are \frac
        (rf"\frac{{{TOWER}}}{{2}}", rf"\tfrac {{{TOWER}}} {{2}}", True),  # spaces do not count
        (rf"\left( {TOWER}, 1 \right)", rf"({TOWER},1)", True),  # nor \left / \right
        (rf"\leftX {TOWER}", rf"X {TOWER}", False),  # \left is a command only before a non-letter
        (rf"\rightX {TOWER}", rf"X {TOWER}", False),
        (rf"\frac{{{TOWER}}}{{2}}", rf"\ffrac{{{TOWER}}}{{2}}", False),
    ],
)
def test_spellings_that_need_no_parse(gold, pred, equal):
    assert math_equal(gold, pred) is equal


@pytest.mark.parametrize(
    "gold,pred",
    [(r"60", r"\frac{5!}{2!}"), ("3628800", "10!"), (r"(n+1)!", r"(1+n)!"), (r"\frac{1}{1024}", r"2^{-10}")],
)
def test_ordinary_powers_and_factorials_still_reach_math_verify(gold, pred):
    assert math_equal(gold, pred)


def test_math_compares_in_a_thread():
    """Prefect runs a stage in a worker thread, where math-verify's SIGALRM timeout cannot be set."""
    got = []
    t = threading.Thread(target=lambda: got.append(is_correct(r"\boxed{4.5}", r"\frac{9}{2}", "math")))
    t.start()
    t.join()
    assert got == [True]


@pytest.mark.parametrize(
    "raw,want",
    [
        ("$12", "12"),
        (r"\$12", "12"),
        ("50%", "50"),
        (r"50\%", "50"),
        ("-0", "0"),
        ("-0.00", "0"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("-.5", "-0.5"),
        ("1,000,000", "1000000"),
        ("100", "100"),  # trailing zeros of an integer stay
        ("7.", "7"),
        ("12,34", "12,34"),  # not a grouped number: text
        ("$ 12 dollars", "$ 12 dollars"),
        ("Paris.", "paris"),
        ("TAX.", "tax"),  # only the final period goes
    ],
)
def test_normalize_numbers_by_value(raw, want):
    assert normalize(raw) == want


def test_canonical_number():
    assert canonical_number("1,000.50") == "1000.5" and canonical_number("-0.0") == "0"
    assert canonical_number("1000") == "1000" and canonical_number("0.001") == "0.001"


def test_boxed_contents_in_order():
    assert boxed(r"\boxed{a{b}c} x \fbox{d} \boxed{e}") == ["a{b}c", "d", "e"]
    assert boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == [r"\frac{1}{\sqrt{2}}"]
    assert boxed("no box {x}") == []


@pytest.mark.parametrize(
    "answers,fmt,want",
    [
        (["1", "2", None, "2", "1"], "auto", "1"),  # a tie goes to the answer given first
        (["2", "1", "1"], "auto", "1"),  # otherwise the most common
        (["b", "a"], "auto", "b"),
        ([None, "3", None, None], "auto", "3"),  # the unanswered do not vote
        ([None, None], "auto", None),
        ([], "gsm8k", None),
        (["1", r"\frac{1}{2}", "0.5"], "math", r"\frac{1}{2}"),  # equal values are one vote under math
        (["1", r"\frac{1}{2}", "0.5"], "auto", "1"),  # text votes: three answers, one each
    ],
)
def test_majority(answers, fmt, want):
    assert majority(answers, fmt) == want


def test_same_answer_needs_both_sides():
    assert not same_answer(None, "1", "auto") and not same_answer("1", None, "math")
    assert same_answer("1", "1", "auto") and not same_answer("1", "2", "math")
