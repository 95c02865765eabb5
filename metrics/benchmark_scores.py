"""Scoring a utility task's answers: `score_task(kind, examples, responses)` -> rows of metrics,
"all" first, then one row per category; `headline_units` -> the per-unit values of the headline
(for intervals). The Examples are those `datamodules.benchmarks.read_task` returns.

| family | metrics ("all" row) | headline | unit |
|---|---|---|---|
| vqa (VQAv2, TextVQA) | vqa_accuracy | vqa_accuracy | a question's soft score |
| ScienceQA-IMG | accuracy, extracted (share of answers a letter was read from) | accuracy | a question |
| MMBench | accuracy (CircularEval), accuracy_single (originals, one pass), extracted | accuracy | a question + copies |
| pope | f1_mean (mean of the categories' F1); accuracy, precision, recall, f1, yes_ratio pooled | f1_mean | (bootstrap) |
| mme | accuracy; perception_score, cognition_score; per subtask accuracy_plus, score | accuracy | a question |

MMBench's CircularEval (lmms-eval `tasks/mmbench/mmbench_evals.py:275-304`, `eval_sub_data`
:206-234): the dev release holds each question i once as is (index i < 10^6) and again with its
options rotated (index k * 10^6 + i); a question counts as right only if every row of its group
is answered with that row's gold letter. The originals scored alone are `accuracy_single`. A
release without copies gives the same number twice. Category rows follow the original's category.

All metrics are in [0, 1] except MME's scores (0..200 per subtask, summed as MME reports them).

Answers written by LLaVA's own evaluation scripts (JSON lines `{question_id, prompt, text, ...}`)
are scored with

    python -m metrics.benchmark_scores KIND PATH --answers ANSWERS.jsonl [--annotations A] [--image-dir D] [--split S]

Each question takes the answer with its question_id (the n-th answer of an id that several
questions share, MME's image or TextVQA's image id, answers the n-th such question); answers to
questions outside the task are left out, as LLaVA's ScienceQA script scores the image problems
out of its answers to every test problem (`eval_science_qa.py:46-63`, "IMG-Accuracy" :99-105).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from typing import Optional, Sequence

import numpy as np

import pandas as pd

from core.errors import UserError, cli_main
from core.records import read_jsonl
from datamodules.benchmarks import TASK_KINDS, UTILITY_KINDS, read_task
from datamodules.examples import Example
from metrics.multiple_choice import read_letter
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
        return [float(read_letter(kind, r, ex.extra["options"]) == ex.answer) for ex, r in zip(examples, responses)]
    read = pope_answer if family == "pope" else mme_answer
    return [float(read(r) == ex.answer) for ex, r in zip(examples, responses)]


def _rows(examples: Sequence[Example], score, members: Optional[Sequence[int]] = None) -> dict[str, dict[str, float]]:
    """score(indices) -> metrics, for all examples (or `members`) and per category."""
    members = range(len(examples)) if members is None else members
    groups: dict[str, list[int]] = defaultdict(list)
    for i in members:
        if examples[i].category:
            groups[examples[i].category].append(i)
    rows = {"all": score(list(members))}
    return rows | {c: score(groups[c]) for c in sorted(groups)}


def _circular_index(ex: Example) -> Optional[int]:
    for value in (ex.id, ex.extra.get("question_id")):
        try:
            return int(str(value))
        except ValueError:
            continue
    return None


def circular_groups(examples: Sequence[Example]) -> dict[int, list[int]]:
    """MMBench: the original's position -> positions of every row of its group (itself first), a
    group being the rows whose index is the same mod 10^6. A group whose original (index < 10^6)
    is not among the examples is not scored (as mmbench_evals.py:275); a row with no integer
    index is a question of its own."""
    by_group: dict[object, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        index = _circular_index(ex)
        by_group[("id", ex.id) if index is None else index % 10**6].append(i)
    originals = {}
    for members in by_group.values():
        first = [i for i in members if (_circular_index(examples[i]) or 0) < 10**6]
        if len(first) > 1:
            raise UserError(f"mmbench: questions {', '.join(examples[i].id for i in first)} share one index "
                            "(a question appears twice)")
        if first:
            originals[first[0]] = first + [i for i in members if i != first[0]]
    return originals


def headline_units(kind: str, examples: Sequence[Example], responses: Sequence[str]) -> list[tuple[Optional[str], float]]:
    """(category, value) per unit the headline averages (the table above); [] for POPE's mean F1."""
    family, per_example = _family(kind), example_scores(kind, examples, responses)
    if family == "pope":
        return []
    if kind == "mmbench":
        return [(examples[o].category, float(all(per_example[i] for i in rows)))
                for o, rows in circular_groups(examples).items()]
    return [(ex.category, s) for ex, s in zip(examples, per_example)]


def _pope_rows(examples: Sequence[Example], responses: Sequence[str]) -> dict[str, dict[str, float]]:
    rows = _rows(examples, lambda ix: pope_scores([responses[i] for i in ix], [examples[i].answer for i in ix]))
    categories = [c for c in rows if c != "all"]
    f1s = [rows[c]["f1"] for c in categories] or [rows["all"]["f1"]]
    rows["all"] = {"f1_mean": sum(f1s) / len(f1s), **rows["all"]}  # LLaVA-1.5's POPE number
    return rows


def pope_f1_interval(examples: Sequence[Example], responses: Sequence[str], n_resamples: int, seed: int,
                     confidence: float) -> tuple[float, float]:
    """Percentile bootstrap of `f1_mean`, questions resampled within each category."""
    rng, stats = np.random.default_rng(seed), []
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_cat[ex.category or ""].append(i)
    arrays = [(np.array([pope_answer(responses[i]) == "yes" for i in ix]), np.array([examples[i].answer == "yes" for i in ix]))
              for ix in by_cat.values()]
    for _ in range(n_resamples):
        f1s = []
        for pred, gold in arrays:
            pick = rng.integers(0, len(pred), len(pred))
            p, g = pred[pick], gold[pick]
            tp, fp, fn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum()
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        stats.append(sum(f1s) / len(f1s))
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def score_task(kind: str, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, dict[str, float]]:
    family = _family(kind)
    per_example = example_scores(kind, examples, responses)
    if family == "vqa":
        return _rows(examples, lambda ix: {"vqa_accuracy": sum(per_example[i] for i in ix) / len(ix)})
    if family == "multiple_choice":
        read = [read_letter(kind, r, ex.extra["options"]) is not None for ex, r in zip(examples, responses)]
        if kind != "mmbench":
            return _rows(examples, lambda ix: {"accuracy": sum(per_example[i] for i in ix) / len(ix),
                                               "extracted": sum(read[i] for i in ix) / len(ix)})
        groups = circular_groups(examples)
        if not groups:
            raise UserError("mmbench: no original questions (index < 1000000) among the examples to score")
        hit = {o: all(per_example[i] for i in rows) for o, rows in groups.items()}
        every = lambda ix: [i for o in ix for i in groups[o]]  # noqa: E731
        return _rows(examples, lambda ix: {"accuracy": sum(hit[o] for o in ix) / len(ix),
                                           "accuracy_single": sum(per_example[o] for o in ix) / len(ix),
                                           "extracted": sum(read[i] for i in every(ix)) / len(every(ix))},
                     members=list(groups))
    if family == "pope":
        return _pope_rows(examples, responses)
    return mme_scores(responses, [ex.answer for ex in examples], [ex.category or "" for ex in examples],
                      [ex.extra.get("image_key", ex.id) for ex in examples])


def llava_responses(path, examples: Sequence[Example]) -> list[str]:
    """The `text` answering each question in a LLaVA answers file, matched by question_id (module
    docstring); without question_ids, line n answers question n."""
    rows = read_jsonl(path, "answers file")
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path}: line {n} has no 'text' answer")
    if not all("question_id" in row for row in rows):
        if len(rows) != len(examples):
            raise UserError(f"{path}: {len(rows)} answers for {len(examples)} questions (and no question_id to match them by)")
        return [row["text"] for row in rows]
    seen: Counter = Counter()
    answers = {}
    for row in rows:
        qid = str(row["question_id"])
        seen[qid] += 1
        answers[(qid, seen[qid])] = row["text"]
    asked: Counter = Counter()
    out = []
    for ex in examples:
        qid = str(ex.extra.get("question_id", ex.id))
        asked[qid] += 1
        if (qid, asked[qid]) not in answers:
            nth = f" (the {asked[qid]}. question with this id)" if asked[qid] > 1 else ""
            raise UserError(f"{path}: no answer to question_id {qid!r}{nth}; {len(rows)} answers for "
                            f"{len(examples)} questions")
        out.append(answers[(qid, asked[qid])])
    return out


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
