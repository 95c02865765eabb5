"""The scorers against each benchmark's reference rule, one case per row, through `score_task`.

Every expected value is what the reference's own code gives for that input, worked out from its
source (file and line beside the case): LLaVA at c121f04 (`llava/eval/eval_science_qa.py`,
`eval_pope.py`, `m4c_evaluator.py`), MME's `eval_tool/calculation.py` (as LLaVA runs it after
`convert_answer_to_mme.py`), lmms-eval's `tasks/mmbench/mmbench_evals.py` (CircularEval and its
rule-based matching) and `tasks/textvqa/utils.py`."""

from __future__ import annotations

import pytest

from core.errors import UserError
from datamodules.benchmarks.utility import choice_example, vqa_example, yes_no_example
from metrics.benchmark_scores import score_task

SQA_OPTIONS = ["shark", "whale", "trout"]  # A, B, C
MMB_OPTIONS = ["a cat", "a dog", "a bird"]


def _vqa(kind, response, answers):
    return score_task(kind, [vqa_example("case", 1, None, "Q?", answers)], [response])["all"]["vqa_accuracy"]


def _letter(kind, response, gold, options=SQA_OPTIONS):
    ex = choice_example("case", 5, None, "Q?", dict(zip("ABCDE", options)), gold)
    return score_task(kind, [ex], [response])["all"]["accuracy"]


def _mme(response, gold):
    exs = [yes_no_example("case", "existence/1.jpg", None, "Q?", gold, "existence", image_key="existence/1.jpg")]
    return score_task("mme", exs, [response])["all"]["accuracy"]


def _pope(response, gold):
    return score_task("pope", [yes_no_example("case", 1, None, "Q?", gold, "random")], [response])["all"]["accuracy"]


CASES = [
    # VQAv2 / TextVQA: min(#other humans agreeing / 3, 1), averaged over each human left out
    # (m4c_evaluator.py:237-244; lmms-eval textvqa/utils.py:27-32)
    ("vqa 10 agree", lambda: _vqa("vqav2", "Two", ["2"] * 9 + ["two"]), 1.0),   # disagreeing refs normalised
    ("vqa 2 of 10", lambda: _vqa("vqav2", "red", ["red"] * 2 + ["blue"] * 8), 0.6),
    ("vqa 1 of 10", lambda: _vqa("textvqa", "stop", ["stop"] + ["go"] * 9), 0.3),
    ("vqa one reference", lambda: _vqa("textvqa", "cat", ["cat"]), 0.0),           # nobody left to agree
    ("vqa two references", lambda: _vqa("textvqa", "cat", ["cat", "cat"]), 1 / 3),
    ("textvqa case", lambda: _vqa("textvqa", "NIKE", ["Nike"] * 6 + ["nike"] * 4), 1.0),  # m4c normalises all
    # ScienceQA: eval_science_qa.py:65-75 on the raw text, then get_pred_idx :32-35
    ("sqa letter", lambda: _letter("scienceqa_img", "B", "B"), 1.0),                       # :65
    ("sqa letter dot", lambda: _letter("scienceqa_img", "B. whale", "B"), 1.0),            # :67
    ("sqa phrase then other letter", lambda: _letter("scienceqa_img", "The answer is C. Option A is wrong.", "C"), 1.0),  # :70-73
    ("sqa phrase twice", lambda: _letter("scienceqa_img", "The answer is A. The answer is A.", "A"), 0.0),  # :72 len 2
    ("sqa phrase at end", lambda: _letter("scienceqa_img", "The answer is B", "B"), 0.0),  # "." needs a character
    ("sqa lower case", lambda: _letter("scienceqa_img", "b", "B"), 0.0),
    ("sqa parentheses", lambda: _letter("scienceqa_img", "(B)", "B"), 0.0),
    ("sqa letter sentence", lambda: _letter("scienceqa_img", "A is correct", "A"), 0.0),
    ("sqa negation", lambda: _letter("scienceqa_img", "Not B", "B"), 0.0),
    ("sqa neither", lambda: _letter("scienceqa_img", "Neither A nor B", "B"), 0.0),
    ("sqa list", lambda: _letter("scienceqa_img", "both A and C", "C"), 0.0),
    ("sqa option text", lambda: _letter("scienceqa_img", "whale", "B"), 0.0),
    ("sqa fifth option", lambda: _letter("scienceqa_img", "E", "E", SQA_OPTIONS + ["eel", "cod"]), 1.0),
    # MMBench rule-based matching: can_infer_option mmbench_evals.py:79-105, can_infer_text :107-119
    ("mmb negation", lambda: _letter("mmbench", "Not B", "B", MMB_OPTIONS), 1.0),          # one letter word (:92-98)
    ("mmb letter sentence", lambda: _letter("mmbench", "A is correct", "A", MMB_OPTIONS), 1.0),  # 3 words: not an article (:94)
    ("mmb neither", lambda: _letter("mmbench", "Neither A nor B", "B", MMB_OPTIONS), 0.0),  # two letters: none
    ("mmb list", lambda: _letter("mmbench", "both A and C", "C", MMB_OPTIONS), 0.0),
    ("mmb article then C.", lambda: _letter("mmbench", "The answer is C. Option A is wrong.", "C", MMB_OPTIONS), 1.0),  # :94 then "C." (:99)
    ("mmb parentheses", lambda: _letter("mmbench", "(B) a dog", "B", MMB_OPTIONS), 1.0),   # "(B)" (:99)
    ("mmb option text", lambda: _letter("mmbench", "I think it is a dog", "B", MMB_OPTIONS), 1.0),  # :115-118
    ("mmb two option texts", lambda: _letter("mmbench", "A cat or a dog", "A", MMB_OPTIONS), 0.0),  # :117 two
    # POPE: eval_pope.py:11-20
    ("pope first sentence", lambda: _pope("Yes. There is no cat.", "yes"), 1.0),
    ("pope no word -> yes", lambda: _pope("I cannot tell", "no"), 0.0),
    ("pope capital Not", lambda: _pope("Not at all", "no"), 0.0),                          # "Not" is not in its list
    ("pope comma", lambda: _pope("No, there is none", "no"), 1.0),
    # MME: calculation.py parse_pred_ans on the lower-cased answer
    ("mme yes", lambda: _mme("Yes", "Yes"), 1.0),
    ("mme period", lambda: _mme("No.", "No"), 1.0),
    ("mme lone y", lambda: _mme("y", "Yes"), 0.0),
    ("mme leading spaces", lambda: _mme("  yes", "Yes"), 0.0),
    ("mme not", lambda: _mme("Not really", "No"), 1.0),
    ("mme phrase", lambda: _mme("The answer is yes", "Yes"), 0.0),
]


@pytest.mark.parametrize("name, compute, expected", CASES, ids=[c[0] for c in CASES])
def test_scorer_matches_the_reference_rule(name, compute, expected):
    assert compute() == pytest.approx(expected)


def _mmb_row(index, options, gold, category="scene"):
    return choice_example("case", index, None, "Q?", dict(zip("ABCD", options)), gold, category=category,
                          group=str(index % 10**6))


def test_mmbench_circular_eval_needs_every_rotation():
    # question 1 right in 3 of 4 rotations, question 2 in all 2 (mmbench_evals.py:214-215, :298-302)
    rows = [_mmb_row(1, ["w", "x", "y", "z"], "A"), _mmb_row(1000001, ["x", "y", "z", "w"], "D"),
            _mmb_row(2000001, ["y", "z", "w", "x"], "C"), _mmb_row(3000001, ["z", "w", "x", "y"], "B"),
            _mmb_row(2, ["p", "q"], "B", "color"), _mmb_row(1000002, ["q", "p"], "A", "color")]
    answers = ["A", "D", "C", "C", "B", "A"]
    scores = score_task("mmbench", rows, answers)
    assert scores["all"] == pytest.approx({"accuracy": 0.5, "accuracy_single": 1.0, "extracted": 1.0})
    assert scores["scene"]["accuracy"] == 0.0 and scores["color"]["accuracy"] == 1.0
    # an unreadable copy fails its question too (the official evaluator would ask ChatGPT)
    assert score_task("mmbench", rows[4:], ["B", "no idea"])["all"]["accuracy"] == 0.0
    # a group is the rows present (a sample may hold some copies); a copy without its original is
    # not scored (only index < 10^6 opens a group, mmbench_evals.py:275)
    assert score_task("mmbench", rows[:2], ["A", "A"])["all"] == pytest.approx(
        {"accuracy": 0.0, "accuracy_single": 1.0, "extracted": 1.0})
    with pytest.raises(UserError, match="no original questions"):
        score_task("mmbench", rows[1:2], ["D"])


def test_pope_mean_f1_over_categories_and_pooled():
    # adversarial: TP1 FP1 -> F1 2/3; popular: all right -> 1; random: TP1 FN1 TN1 -> F1 2/3
    cases = [("adversarial", "yes", "Yes"), ("adversarial", "no", "Yes"), ("popular", "yes", "Yes"),
             ("popular", "no", "No"), ("random", "yes", "No"), ("random", "yes", "Yes"), ("random", "no", "No")]
    exs = [yes_no_example("case", i, None, "Q?", gold, cat) for i, (cat, gold, _) in enumerate(cases)]
    rows = score_task("pope", exs, [r for _, _, r in cases])
    assert rows["all"]["f1_mean"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert rows["all"]["f1"] == pytest.approx(0.75) and rows["all"]["accuracy"] == pytest.approx(5 / 7)
    assert rows["random"]["f1"] == pytest.approx(2 / 3) and "f1_mean" not in rows["random"]


def test_mme_scores_pairs_per_image():
    # calculation.py: acc over questions, acc+ over images with both right; score = 100 (acc + acc+)
    exs = [yes_no_example("case", f"existence/{img}.jpg#{k}", None, "Q?", gold, "existence", image_key=f"existence/{img}.jpg")
           for img, k, gold in [(1, 1, "Yes"), (1, 2, "No"), (2, 1, "Yes"), (2, 2, "No")]]
    exs += [yes_no_example("case", "code_reasoning/1.png#1", None, "Q?", "Yes", "code_reasoning",
                           image_key="code_reasoning/1.png"),
            yes_no_example("case", "code_reasoning/1.png#2", None, "Q?", "No", "code_reasoning",
                           image_key="code_reasoning/1.png")]
    rows = score_task("mme", exs, ["Yes", "No", "Yes", "Yes", "yes", "y"])
    assert rows["existence"] == pytest.approx({"accuracy": 0.75, "accuracy_plus": 0.5, "score": 125.0})
    assert rows["all"]["perception_score"] == 125.0 and rows["all"]["cognition_score"] == 50.0


def test_circular_groups_follow_the_index_alone():
    from datamodules.examples import Example

    def row(index, gold):  # as a caller might build them: no `group`, the index as id
        return Example(id=str(index), image=None, instruction="Q?", response=None, safe=True, subset="utility",
                       answer=gold, category="c", extra={"options": {"A": "x", "B": "y"}})

    rows = [row(7, "A"), row(1000007, "B"), row(8, "B")]
    assert score_task("mmbench", rows, ["A", "A", "B"])["all"]["accuracy"] == 0.5
    with pytest.raises(UserError, match="share one index"):
        score_task("mmbench", [row(7, "A"), row(7, "A")], ["A", "A"])
