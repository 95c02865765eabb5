"""Utility benchmarks -> Examples carrying what their scorer needs, from the Hugging Face parquet
releases (lmms-lab's copies: VQAv2, TextVQA, ScienceQA-IMG, MMBench, POPE, MME).

Prompts are LLaVA-1.5's evaluation prompts, which the paper's code base runs (and lmms-eval's
defaults): short-answer tasks end with `SHORT_ANSWER`; multiple choice lists "A. option" lines and
ends with `MC_PROMPT`; MME's " Please answer yes or no." is replaced by "\n" + `SHORT_ANSWER`
(lmms-eval `tasks/mme/utils.py:37-45` with `mme.yaml`'s default post_prompt; LLaVA's
`llava_mme.jsonl` is written the same way); TextVQA's lower-case questions are capitalised
(`str.capitalize`, lmms-eval `tasks/textvqa/utils.py:54`).
Every Example is benign (`safe=True`, subset "utility"); `answer` is the gold answer and `extra`
holds `answers` (VQA: every human answer), `options` (multiple choice), `image_key` (MME: the
image a question pair shares) and `group` (MMBench: index mod 10^6, the question a CircularEval
copy belongs to; MME: the image), which sampling keeps together.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from core.errors import UserError
from datamodules.benchmarks.parquet import iter_rows, parquet_files
from datamodules.examples import Example
from datamodules.benchmarks.prompts import LETTERS, MC_PROMPT, SHORT_ANSWER, format_question, option_letters

UTILITY_SUBSET = "utility"


def _text(where: str, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' is {value!r}, not a non-empty string")
    return value


def _example(qid, image: Optional[str], instruction: str, answer: str, category, **extra) -> Example:
    return Example(id=str(qid), image=image, instruction=instruction, response=None, safe=True,
                   subset=UTILITY_SUBSET, answer=answer, category=None if category is None else str(category),
                   extra={k: v for k, v in extra.items() if v is not None})


def vqa_example(where: str, qid, image, question: str, answers: list, category=None, prompt: str = SHORT_ANSWER,
                ocr_tokens: Optional[list] = None, question_id=None) -> Example:
    """A short-answer question; `answers` are the human answers (ten in VQAv2 and TextVQA)."""
    answers = [a.get("answer") if isinstance(a, dict) else a for a in (answers or [])]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where} (question_id={qid}): no reference answers (a test split without answers is "
                        "scored by the benchmark's server, not here)")
    lines = [question.strip()]
    if ocr_tokens:  # LLaVA-1.5's TextVQA file gives the OCR tokens as a hint
        lines.append("Reference OCR token: " + ", ".join(map(str, ocr_tokens)))
    most_common = Counter(answers).most_common(1)[0][0]
    return _example(qid, image, "\n".join(lines + ([prompt] if prompt else [])), most_common, category,
                    answers=answers, question_id=qid if question_id is None else question_id)


def choice_example(where: str, qid, image, question: str, options: dict, gold: str, hint=None, category=None,
                   prompt: str = MC_PROMPT, group=None) -> Example:
    option_letters(len(options))
    if gold not in options:
        raise UserError(f"{where} (id={qid}): the answer {gold!r} is not one of the options {', '.join(options)}")
    return _example(qid, image, format_question(question.strip(), options, hint, prompt), gold, category,
                    options=options, question_id=qid, group=group)


def yes_no_example(where: str, qid, image, question: str, answer: str, category, image_key=None,
                   prompt: Optional[str] = None) -> Example:
    label = str(answer).strip().lower().rstrip(".")
    if label not in ("yes", "no"):
        raise UserError(f"{where} (question_id={qid}): the answer {answer!r} is not yes or no")
    return _example(qid, image, f"{question.strip()}\n{prompt}" if prompt else question.strip(), label, category,
                    question_id=image_key or qid, image_key=image_key, group=image_key)  # MME: the id LLaVA's files use


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan")


# -- the lmms-lab parquet releases ------------------------------------------------------------------
def vqav2_parquet(files: list[Path]) -> list[Example]:
    return [vqa_example(where, rec["question_id"], image, _text(where, rec, "question"), rec.get("answers"),
                        rec.get("answer_type"))
            for where, _, rec, image in iter_rows(files, ["question_id", "question", "answers"], ["answer_type"],
                                                  what="VQAv2")]


def textvqa_parquet(files: list[Path], ocr: bool = True) -> list[Example]:
    return [vqa_example(where, rec["question_id"], image, _text(where, rec, "question").strip().capitalize(),
                        rec.get("answers"), ocr_tokens=rec.get("ocr_tokens") if ocr else None)
            for where, _, rec, image in iter_rows(files, ["question_id", "question", "answers"], ["ocr_tokens"],
                                                  what="TextVQA")]


def scienceqa_parquet(files: list[Path]) -> list[Example]:
    out = []
    for where, row, rec, image in iter_rows(files, ["question", "choices", "answer"], ["hint", "subject", "id"],
                                            what="ScienceQA"):
        choices, gold = rec["choices"], rec["answer"]
        if not isinstance(choices, list) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise UserError(f"{where}: 'choices' {choices!r} and 'answer' {gold!r} do not name an option")
        options = dict(zip(LETTERS, map(str, choices)))
        hint = None if _blank(rec.get("hint")) else f"Context: {rec['hint']}"
        out.append(choice_example(where, rec.get("id", row), image, _text(where, rec, "question"), options,
                                  LETTERS[gold], hint, rec.get("subject")))
    return out


MMBENCH_CIRCULAR = 10**6  # copy k of question i has index k * 10^6 + i (lmms-eval mmbench_evals.py:275, :298)


def mmbench_parquet(files: list[Path]) -> list[Example]:
    """Every row, the CircularEval copies (options rotated, index k * 10^6 + i) included; `group`
    names the question i a row belongs to."""
    out = []
    for where, _, rec, image in iter_rows(files, ["index", "question", "answer", "A", "B"],
                                          ["C", "D", "E", "hint", "category"], what="MMBench"):
        options = {k: str(rec[k]) for k in "ABCDE" if k in rec and not _blank(rec[k])}
        hint = None if _blank(rec.get("hint")) else str(rec["hint"])
        try:
            index = int(rec["index"])
        except (TypeError, ValueError):
            raise UserError(f"{where}: 'index' is {rec['index']!r}, not an integer") from None
        out.append(choice_example(where, index, image, _text(where, rec, "question"), options,
                                  str(rec["answer"]).strip(), hint, rec.get("category"),
                                  group=str(index % MMBENCH_CIRCULAR)))
    return out


def pope_parquet(files: list[Path]) -> list[Example]:
    return [yes_no_example(where, rec["question_id"], image, _text(where, rec, "question"), rec["answer"],
                           rec.get("category"), prompt=SHORT_ANSWER)
            for where, _, rec, image in iter_rows(files, ["question_id", "question", "answer"], ["category"],
                                                  what="POPE")]


MME_YES_NO = " Please answer yes or no."  # lmms-eval tasks/mme/utils.py:30


def mme_parquet(files: list[Path]) -> list[Example]:
    """MME's two questions per image share a `question_id` (the image's path): ids get "#1" / "#2".
    The question's " Please answer yes or no." gives way to "\n" + SHORT_ANSWER (module docstring)."""
    seen: Counter = Counter()
    out = []
    for where, _, rec, image in iter_rows(files, ["question_id", "question", "answer", "category"], what="MME"):
        key = str(rec["question_id"])
        seen[key] += 1
        # exactly lmms-eval's text: a space left by "  Please answer ..." stays before the newline
        prompt = _text(where, rec, "question").strip().replace(MME_YES_NO, "") + "\n" + SHORT_ANSWER
        out.append(yes_no_example(where, f"{key}#{seen[key]}", image, prompt, rec["answer"], rec["category"],
                                  image_key=key))
    return out


PARQUET_READERS: dict[str, Callable[..., list[Example]]] = {
    "vqav2": vqav2_parquet, "textvqa": textvqa_parquet, "scienceqa_img": scienceqa_parquet,
    "mmbench": mmbench_parquet, "pope": pope_parquet, "mme": mme_parquet,
}


def default_config(path: str | Path, split: Optional[str]) -> Optional[str]:
    """A release folder holding several configurations (lmms-lab's POPE: the default one in `data/`,
    the same 9,000 questions again in `Full/`) is read as `datasets.load_dataset` reads it by
    default: `data/` only; `split=` names another (e.g. `split=Full`)."""
    path = Path(path)
    if split or not path.is_dir() or not any((path / "data").glob("*.parquet")):
        return split
    others = [d for d in path.iterdir() if d.is_dir() and d.name != "data" and any(d.rglob("*.parquet"))]
    return "data/" if others else split


def read_parquet_task(kind: str, path: str | Path, split: Optional[str] = None, **options) -> list[Example]:
    examples = PARQUET_READERS[kind](parquet_files(path, default_config(path, split)), **options)
    if not examples:
        raise UserError(f"{path}: no rows")
    return examples
