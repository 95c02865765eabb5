"""Scoring a utility task's answers: `score_task(kind, examples, responses)` -> rows of metrics,
"all" first, then one row per category; `example_scores` -> one number per example (for
bootstrap intervals). The Examples are those `datamodules.benchmarks.read_task` returns.

| family | metrics | per example |
|---|---|---|
| vqa (VQAv2, TextVQA) | vqa_accuracy | the leave-one-out soft score |
| multiple_choice (ScienceQA-IMG, MMBench) | accuracy, extracted (share of answers a letter was read from) | 1 / 0 |
| pope | accuracy, precision, recall, f1, yes_ratio | 1 / 0 |
| mme | accuracy, accuracy_plus (per subtask), perception_score, cognition_score (all row) | 1 / 0 |

All metrics are in [0, 1] except MME's scores (0..200 per subtask, summed as MME reports them).

Answers written by LLaVA's own evaluation scripts (JSON lines `{question_id, prompt, text, ...}`,
in question-file order) are scored with

    python -m metrics.benchmark_scores KIND PATH --answers ANSWERS.jsonl [--annotations A] [--image-dir D] [--split S]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Sequence

import pandas as pd

from core.errors import UserError, cli_main
from core.records import read_jsonl
from datamodules.benchmarks import TASK_KINDS, UTILITY_KINDS, read_task
from datamodules.examples import Example
from metrics.multiple_choice import extract_choice
from metrics.vqa_accuracy import vqa_score
from metrics.yes_no import mme_answer, mme_scores, pope_answer, pope_scores


def _family(kind: str) -> str:
    if kind not in TASK_KINDS:
        raise UserError(f"unknown benchmark kind {kind!r}; choose from {', '.join(TASK_KINDS)}")
    family = TASK_KINDS[kind].family
    if family == "safety":
        raise UserError(f"{kind} is a safety benchmark: evaluate judges it (refusals and the harm judge), "
                        "score_task scores utility tasks only")
    return family


def _check(kind: str, examples: Sequence[Example], responses: Sequence[str], key: str) -> None:
    if len(examples) != len(responses) or not examples:
        raise UserError(f"{kind}: {len(responses)} responses for {len(examples)} questions")
    for ex in examples:
        if (ex.extra.get(key) if key in ("answers", "options") else ex.answer) in (None, [], {}):
            raise UserError(f"{kind}: question id={ex.id} carries no reference '{key}' to score against")


_REFERENCE = {"vqa": "answers", "multiple_choice": "options", "pope": "answer", "mme": "answer"}


def example_scores(kind: str, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
    family = _family(kind)
    _check(kind, examples, responses, _REFERENCE[family])
    if family == "vqa":
        return [vqa_score(r, ex.extra["answers"], always_normalize=kind == "textvqa") for ex, r in zip(examples, responses)]
    if family == "multiple_choice":
        return [float(extract_choice(r, ex.extra["options"]) == ex.answer) for ex, r in zip(examples, responses)]
    read = pope_answer if family == "pope" else mme_answer
    return [float(read(r) == ex.answer) for ex, r in zip(examples, responses)]


def _rows(examples: Sequence[Example], score) -> dict[str, dict[str, float]]:
    """score(indices) -> metrics, for all examples and per category."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        if ex.category:
            groups[ex.category].append(i)
    rows = {"all": score(list(range(len(examples))))}
    return rows | {c: score(groups[c]) for c in sorted(groups)}


def score_task(kind: str, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, dict[str, float]]:
    family = _family(kind)
    per_example = example_scores(kind, examples, responses)
    if family == "vqa":
        return _rows(examples, lambda ix: {"vqa_accuracy": sum(per_example[i] for i in ix) / len(ix)})
    if family == "multiple_choice":
        read = [extract_choice(r, ex.extra["options"]) is not None for ex, r in zip(examples, responses)]
        return _rows(examples, lambda ix: {"accuracy": sum(per_example[i] for i in ix) / len(ix),
                                           "extracted": sum(read[i] for i in ix) / len(ix)})
    if family == "pope":
        return _rows(examples, lambda ix: pope_scores([responses[i] for i in ix], [examples[i].answer for i in ix]))
    return mme_scores(responses, [ex.answer for ex in examples], [ex.category or "" for ex in examples],
                      [ex.extra.get("image_key", ex.id) for ex in examples])


def llava_responses(path, examples: Sequence[Example]) -> list[str]:
    """The `text` of each line of a LLaVA answers file, checked line by line against the questions."""
    rows = read_jsonl(path, "answers file")
    if len(rows) != len(examples):
        raise UserError(f"{path}: {len(rows)} answers for {len(examples)} questions")
    for n, (row, ex) in enumerate(zip(rows, examples), 1):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path}: line {n} has no 'text' answer")
        if "question_id" in row and str(row["question_id"]) != str(ex.extra.get("question_id")):
            raise UserError(f"{path}: line {n} answers question_id {row['question_id']!r}, but question {n} "
                            f"is {ex.extra.get('question_id')!r}; answers must follow the question file's order")
    return [row["text"] for row in rows]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m metrics.benchmark_scores", description="Score a utility "
                                     "benchmark's answers (a LLaVA answers file) with the benchmark's official rules.")
    parser.add_argument("kind", choices=UTILITY_KINDS)
    parser.add_argument("path", help="the benchmark: parquet file/folder, LLaVA question file or release folder")
    parser.add_argument("--answers", required=True, help="JSON lines {question_id, text}, one per question, in order")
    parser.add_argument("--annotations", default=None)
    parser.add_argument("--image-dir", default=None)
    parser.add_argument("--split", default=None)
    args = parser.parse_args([a for a in argv if a != "--debug"])
    examples = read_task(args.kind, args.path, args.image_dir, annotations=args.annotations, split=args.split)
    rows = score_task(args.kind, examples, llava_responses(args.answers, examples))
    print(pd.DataFrame.from_dict(rows, orient="index").to_markdown(floatfmt=".4f"))


if __name__ == "__main__":
    cli_main(main)()
