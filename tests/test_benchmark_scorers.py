"""The utility scorers against hand-checked cases: VQA normalisation and leave-one-out accuracy,
the multiple-choice letter readers, POPE and MME yes/no scoring. The cases that check each
benchmark against its reference's own rule, through `score_task`, are in test_benchmark_reference.py."""

from __future__ import annotations

import pytest

from core.errors import UserError
from datamodules.benchmarks.prompts import MC_PROMPT, format_question
from metrics.multiple_choice import multiple_choice_accuracy, read_letter
from metrics.vqa_accuracy import normalize_vqa_answer, vqa_accuracy, vqa_score
from metrics.yes_no import mme_answer, mme_scores, pope_answer, pope_scores

# The official normaliser's rules, one case each (outputs checked by hand against the EvalAI
# processor's code: punctuation, periods, number words, articles, contractions, "'s").
NORMALISED = [
    ("Two dogs.", "2 dogs"),              # number word, final period
    ("1,000", "1000"),                    # comma between digits
    ("one,two", "onetwo"),                # a comma is always deleted first
    ("3.5", "3.5"),                       # decimal point kept
    ("2.0.", "2.0"),
    ("U.S.A.", "usa"),                    # periods not before a digit deleted
    ("the red-and-white bus", "red and white bus"),  # hyphen between words -> space, article dropped
    ("x ; y", "x y"),                     # punctuation next to a space is deleted
    ("a/b", "b"),                         # "/" -> space, then the article "a" drops
    ("(left)", "left"),
    ("It's a cat!", "it 's cat"),         # "'s" split off
    ("A man's hat", "man 's hat"),
    ("dont", "don't"),                    # contractions restored
    ("yall", "y'all"),
    ("oclock", "o'clock"),
    ("none", "0"),
    ("Ten", "10"),
    ("well...", "well"),
    ("100%", "100%"),                     # "%" and "$" are not in the punctuation list
    ("$5", "$5"),
    ("Hello world?", "hello world"),
    ("yes\n", "yes"),
]


@pytest.mark.parametrize("raw, expected", NORMALISED)
def test_vqa_normaliser_on_the_official_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_leave_one_out_scores():
    ten = lambda *pairs: [a for a, n in pairs for _ in range(n)]  # noqa: E731
    assert vqa_score("cat", ["cat"]) == 0.0  # one reference: none left to agree (m4c_evaluator.py:237-244)
    assert vqa_score("cat", ["cat", "cat"]) == pytest.approx(1 / 3)
    assert vqa_score("cat", ten(("cat", 1), ("dog", 9))) == pytest.approx(0.3)
    assert vqa_score("cat", ten(("cat", 2), ("dog", 8))) == pytest.approx(0.6)
    assert vqa_score("cat", ten(("cat", 3), ("dog", 7))) == pytest.approx(0.9)
    assert vqa_score("cat", ten(("cat", 4), ("dog", 6))) == 1.0
    assert vqa_score("bird", ten(("cat", 4), ("dog", 6))) == 0.0
    # normalised on both sides: "Two." == "2"; "The Cat" == "cat"
    assert vqa_score("Two.", ten(("2", 3), ("two", 1), ("3", 6))) == 1.0
    assert vqa_score("The Cat", ten(("cat", 10))) == 1.0
    assert vqa_accuracy(["cat", "bird"], [ten(("cat", 10)), ten(("cat", 10))]) == 0.5


def test_vqav2_and_textvqa_differ_only_on_unanimous_unnormalised_answers():
    unanimous = ["Two"] * 10  # VQAv2 normalises human answers only when they disagree
    assert vqa_score("2", unanimous) == 0.0
    assert vqa_score("2", unanimous, always_normalize=True) == 1.0


def test_vqa_without_references_is_a_user_error():
    with pytest.raises(UserError, match="no reference answers"):
        vqa_score("cat", [])
    with pytest.raises(UserError, match="2 predictions for 1 questions"):
        vqa_accuracy(["a", "b"], [["a"]])


def test_multiple_choice_prompt_and_accuracy():
    assert format_question("What is it?", {"A": "dog", "B": "cat"}, hint="A pet.") == \
        f"A pet.\nWhat is it?\nA. dog\nB. cat\n{MC_PROMPT}"
    assert MC_PROMPT == "Answer with the option's letter from the given choices directly."
    options = {"A": "dog", "B": "cat"}
    assert multiple_choice_accuracy("scienceqa_img", ["B", "B. cat", "cat"], ["B"] * 3, [options] * 3) == \
        pytest.approx(2 / 3)  # LLaVA's script reads no option text
    assert multiple_choice_accuracy("mmbench", ["B", "B. cat", "cat"], ["B"] * 3, [options] * 3) == 1.0
    with pytest.raises(UserError, match="2 responses, 1 gold"):
        multiple_choice_accuracy("mmbench", ["A", "B"], ["A"], [options])
    with pytest.raises(UserError, match="no letter reader for 'vqav2'"):
        read_letter("vqav2", "A", options)


@pytest.mark.parametrize("response, label", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("Yes, there is a dog.", "yes"),
    ("There is not a dog in the image.", "no"), ("No, there is no dog", "no"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence counts
    ("I cannot tell", "yes"),          # the official rule: no "no"/"not" word -> yes
])
def test_pope_answer_follows_the_official_rule(response, label):
    assert pope_answer(response) == label


def test_pope_scores_hand_checked():
    # answers -> yes, yes, no, no, yes ; labels yes, no, no, yes, yes: TP 2, FP 1, TN 1, FN 1
    scores = pope_scores(["Yes", "Yes.", "No", "not there", "yes, a cat"], ["yes", "no", "no", "yes", "Yes"])
    assert scores == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                    "yes_ratio": 0.6})
    assert pope_scores(["no"], ["no"])["precision"] == 0.0  # no "yes" answer: 0, not a crash
    with pytest.raises(UserError, match="'maybe', not yes or no"):
        pope_scores(["yes"], ["maybe"])


@pytest.mark.parametrize("response, label", [
    ("Yes", "yes"), ("no.", "no"), ("Yes, it is.", "yes"), ("No, it is not", "no"),
    ("y", "other"), ("n", "other"),     # calculation.py has no one-letter rule (lmms-eval's parser does)
    (" yes", "yes"), ("  yes", "other"),  # not stripped: the first four characters decide
    ("The answer is yes", "other"), ("Maybe", "other"), ("Not sure", "no"), ("...yes", "other"),
])
def test_mme_answer_follows_the_official_rule(response, label):
    assert mme_answer(response) == label


def test_mme_scores_accuracy_plus_and_perception():
    # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2, score 125
    # code_reasoning: one image, both right -> 200 (cognition)
    rows = mme_scores(["Yes", "No", "Yes", "Yes", "yes", "no"],
                      ["Yes", "No", "Yes", "No", "Yes", "No"],
                      ["existence"] * 4 + ["code_reasoning"] * 2,
                      ["e1", "e1", "e2", "e2", "c1", "c1"])
    assert rows["existence"] == pytest.approx({"accuracy": 0.75, "accuracy_plus": 0.5, "score": 125.0})
    assert rows["code_reasoning"]["score"] == 200.0
    assert rows["all"] == pytest.approx({"accuracy": 5 / 6, "perception_score": 125.0, "cognition_score": 200.0})
    assert list(rows) == ["all", "code_reasoning", "existence"]


def test_letter_readers_on_their_own():
    three = {"A": "shark", "B": "whale", "C": "trout"}
    assert read_letter("scienceqa_img", "D", three) is None  # beyond the options: get_pred_idx -1
    assert read_letter("scienceqa_img", "C. trout", three) == "C"
    assert read_letter("mmbench", "E", three) == "E"  # read, then wrong against any gold of A-C
    assert read_letter("mmbench", "A B", three) is None
    assert read_letter("mmbench", "B, because", three) == "B"
