"""Yes/no benchmarks: POPE (object hallucination) and MME (perception and cognition subtasks).

Reading an answer as yes or no follows each benchmark's own evaluation:

- POPE (`pope_answer`, LLaVA's `llava/eval/eval_pope.py:11-20` at c121f04): keep the first
  sentence (up to the first "."), drop commas, split on spaces; "No", "no" or "not" among the words
  -> no, else yes.
- MME (`mme_answer`, MME's `eval_tool/calculation.py`, `process_result` and `parse_pred_ans`):
  lower-case only (no stripping, periods kept); "yes" / "no" exactly, else "yes" within the first
  four characters, else "no" within them; anything else is "other" (always wrong). A lone "y" is
  "other" (lmms-eval's parser, which strips and maps "y"/"n", differs here). LLaVA's answers reach
  it already stripped (`model_vqa_loader.py:116`).

POPE's metrics treat "yes" as the positive class: accuracy, precision, recall, F1 and the share
of "yes" answers (eval_pope.py:35-61), per category as LLaVA's script prints them
(eval_pope.py:74-80). LLaVA-1.5 reports the mean of the three categories' F1 (`f1_mean`); the
pooled metrics over all questions are kept beside it. A precision, recall or F1 with a zero
denominator is 0.0 (the script divides by zero). MME scores each subtask as accuracy (per
question) and accuracy+ (per image: all of its questions, two in MME, answered right); its score
is 100 x (accuracy + accuracy+), 0..200, and the perception / cognition scores are the sums over
the 10 / 4 subtasks present.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from core.errors import UserError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _label(value: str, where: str) -> str:
    label = str(value).strip().lower().rstrip(".")
    if label not in ("yes", "no"):
        raise UserError(f"{where}: the reference answer is {value!r}, not yes or no")
    return label


def pope_answer(response: str) -> str:
    first = response.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


def mme_answer(response: str) -> str:
    text = response.lower()  # calculation.py lower-cases the answer and nothing else
    if text in ("yes", "no"):
        return text
    head = text[:4]  # parse_pred_ans: the first four characters
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _check(n_responses: int, n_labels: int, what: str) -> None:
    if n_responses != n_labels or not n_labels:
        raise UserError(f"{what}: {n_responses} responses for {n_labels} reference answers")


def pope_scores(responses: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1, yes_ratio (all in [0, 1]) over the given questions, pooled."""
    _check(len(responses), len(labels), "pope_scores")
    preds = [pope_answer(r) for r in responses]
    golds = [_label(g, f"POPE question {i}") for i, g in enumerate(labels)]
    tp = sum(p == g == "yes" for p, g in zip(preds, golds))
    fp = sum(p == "yes" != g for p, g in zip(preds, golds))
    fn = sum(p == "no" != g for p, g in zip(preds, golds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": preds.count("yes") / len(preds)}


def mme_scores(responses: Sequence[str], labels: Sequence[str], subtasks: Sequence[str],
               images: Sequence[str]) -> dict[str, dict[str, float]]:
    """Rows: "all" (accuracy, perception_score, cognition_score), then one per subtask
    (accuracy, accuracy_plus in [0, 1], score in 0..200)."""
    _check(len(responses), len(labels), "mme_scores")
    if not (len(subtasks) == len(images) == len(labels)):
        raise UserError(f"mme_scores: {len(subtasks)} subtasks and {len(images)} images for {len(labels)} questions")
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for i, (response, label, subtask, image) in enumerate(zip(responses, labels, subtasks, images)):
        by_image[subtask][image].append(mme_answer(response) == _label(label, f"MME question {i} ({image})"))
    rows: dict[str, dict[str, float]] = {}
    for subtask, groups in by_image.items():
        answers = [ok for group in groups.values() for ok in group]
        acc, acc_plus = sum(answers) / len(answers), sum(all(g) for g in groups.values()) / len(groups)
        rows[subtask] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": 100 * (acc + acc_plus)}
    correct = [ok for groups in by_image.values() for group in groups.values() for ok in group]
    overall = {"accuracy": sum(correct) / len(correct),
               "perception_score": sum(r["score"] for s, r in rows.items() if s in PERCEPTION),
               "cognition_score": sum(r["score"] for s, r in rows.items() if s in COGNITION)}
    return {"all": overall, **dict(sorted(rows.items()))}
