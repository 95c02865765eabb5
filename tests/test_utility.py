"""VQA-style answer normalisation and the containment rule of the utility metric."""

import pytest

from metrics.utility import answer_matches, normalize_answer


@pytest.mark.parametrize("text, normal", [
    ("The answer is Two dogs.", "answer is 2 dogs"),  # articles dropped, number words -> digits
    ("1,000 people", "1000 people"),  # a comma between digits is dropped
    ("It is 2.5 m tall.", "it is 2.5 m tall"),  # a decimal point survives, a full stop does not
    ("Red-and-white, striped!", "red and white striped"),
    ("An apple\nand\ta pear", "apple and pear"),
    ("none", "0"),
    ("  ", ""),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("response, reference, correct", [
    ("There are two cats in the picture.", "2", True),
    ("There are 2 cats.", "two", True),
    ("There are 20 cats.", "two", False),  # whole words only
    ("It is a red car.", "Red", True),
    ("It is reddish.", "red", False),
    ("The man is riding a bicycle.", "riding bicycle", True),  # articles ignored on both sides
    ("The car is blue.", ["red", "blue"], True),  # a list of references: any one counts
    ("Yes.", "no", False),
])
def test_answer_matches(response, reference, correct):
    assert answer_matches(response, reference) is correct


def test_no_reference_means_not_answerable():
    assert answer_matches("anything", None) is None
    assert answer_matches("anything", "") is None
    assert answer_matches("anything", ["", "  .  "]) is None
