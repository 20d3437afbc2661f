from rlme_pipeline.algorithm.answers import extract_answer, is_correct


def test_extract_answer():
    assert extract_answer("What is 2+3? The answer is 5.") == "5"
    assert extract_answer("2+3 = 4, no wait, 5") == "5"
    assert extract_answer("The answer is 1,000.0 apples") == "1000"
    assert extract_answer("The answer is Paris. Surely.") == "paris"
    assert extract_answer("no digits here") is None and extract_answer("") is None


def test_is_correct():
    assert is_correct("The answer is 31.", "31") and is_correct("so -4", "-4")
    assert not is_correct("The answer is 30", "31") and not is_correct("nothing", "31") and not is_correct("31", None)
