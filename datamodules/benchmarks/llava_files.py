"""LLaVA's evaluation files (its `playground/data/eval` layout) -> utility Examples.

A question file is JSON lines `{question_id, image, text, category}` whose `text` is already the
full prompt; the gold answers come from the benchmark's own annotation file (`annotations=`):

- VQAv2: `v2_mscoco_val2014_annotations.json` (`{"annotations": [{question_id, answers, answer_type}]}`);
  LLaVA's test-dev file has no public answers (its server scores it);
- TextVQA: `TextVQA_0.5.1_val.json` (`{"data": [{question_id, image_id, question, answers}]}`), matched
  as LLaVA's scorer does: the question file's `question_id` is the image id, and the question is
  the prompt's first line;
- POPE: the `coco/` folder of `coco_pope_<category>.json` label files (JSON lines with `label`),
  matched in order within each category, as POPE's script does;
- MME: the `MME_Benchmark_release_version` folder, whose `<subtask>/[questions_answers_YN/]<image>.txt`
  files hold "question<TAB>answer" lines; LLaVA's `llava_mme.jsonl` prompt ("<question>\nAnswer the
  question using a single word or phrase.") is matched to its question as LLaVA's
  `convert_answer_to_mme.py` matches it (`mme_question`).

ScienceQA-IMG is read from its own release: `problems.json`, `pid_splits.json` and
`images/<split>/<pid>/image.png`; the test problems that have an image.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

from core.errors import UserError
from core.records import read_jsonl, read_text
from datamodules.benchmarks.prompts import LETTERS, SHORT_ANSWER
from datamodules.benchmarks.utility import choice_example, vqa_example, yes_no_example
from datamodules.examples import Example


def _json_object(path: Path, key: Optional[str] = None):
    try:
        data = json.loads(read_text(path, "annotation file"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if key is not None and not (isinstance(data, dict) and isinstance(data.get(key), list)):
        raise UserError(f"{path}: expected a JSON object with a {key!r} list; is this the right annotation file?")
    return data[key] if key else data


def _questions(path: Path) -> list[dict]:
    rows = read_jsonl(path, "question file")
    if not rows:
        raise UserError(f"{path}: empty question file")
    for n, row in enumerate(rows, 1):
        for key in ("question_id", "text"):
            if key not in row:
                raise UserError(f"{path}: line {n} has no '{key}'; expected LLaVA's {{question_id, image, text}} lines")
    return rows


def _image(image_dir: Optional[Path], row: dict) -> Optional[str]:
    name = row.get("image")
    return str(image_dir / name) if name and image_dir else name or None


def _needs(annotations, kind: str, what: str) -> Path:
    if not annotations:
        raise UserError(f"a LLaVA {kind} question file needs annotations=<{what}> for its reference answers")
    return Path(annotations)


def vqav2_llava(path: Path, image_dir: Optional[Path], annotations=None) -> list[Example]:
    ann_path = _needs(annotations, "vqav2", "v2_mscoco_val2014_annotations.json")
    answers = {a.get("question_id"): a for a in _json_object(ann_path, "annotations")}
    out = []
    for n, row in enumerate(_questions(path), 1):
        ann = answers.get(row["question_id"])
        if ann is None:
            raise UserError(f"{path}: line {n}: question_id {row['question_id']} is not in {ann_path}")
        out.append(vqa_example(f"{path}: line {n}", row["question_id"], _image(image_dir, row), row["text"],
                               ann.get("answers"), ann.get("answer_type"), prompt=None))
    return out


def textvqa_llava(path: Path, image_dir: Optional[Path], annotations=None) -> list[Example]:
    ann_path = _needs(annotations, "textvqa", "TextVQA_0.5.1_val.json")
    data = _json_object(ann_path, "data")
    by_key = {(str(a.get("image_id")), str(a.get("question", "")).lower()): a for a in data}
    out = []
    for n, row in enumerate(_questions(path), 1):
        lines = [line for line in row["text"].split("\n") if not line.startswith("Reference OCR token:")]
        ann = by_key.get((str(row["question_id"]), lines[0].strip().lower()))
        if ann is None:
            raise UserError(f"{path}: line {n}: no annotation in {ann_path} for image {row['question_id']} "
                            f"and question {lines[0]!r}")
        out.append(vqa_example(f"{path}: line {n}", f"{row['question_id']}:{ann.get('question_id')}",
                               _image(image_dir, row), row["text"], ann.get("answers"), prompt=None,
                               question_id=row["question_id"]))
    return out


def pope_llava(path: Path, image_dir: Optional[Path], annotations=None) -> list[Example]:
    label_dir = _needs(annotations, "pope", "the coco/ folder of coco_pope_<category>.json files")
    questions = _questions(path)
    out = []
    for category in dict.fromkeys(str(q.get("category")) for q in questions):
        label_file = label_dir / f"coco_pope_{category}.json"
        labels = read_jsonl(label_file, "POPE label file")
        rows = [q for q in questions if str(q.get("category")) == category]
        if len(labels) != len(rows):
            raise UserError(f"{label_file}: {len(labels)} labels for {len(rows)} '{category}' questions in {path}")
        for n, (row, label) in enumerate(zip(rows, labels), 1):
            if "label" not in label:
                raise UserError(f"{label_file}: line {n} has no 'label'")
            out.append(yes_no_example(f"{label_file}: line {n}", row["question_id"], _image(image_dir, row),
                                      row["text"], label["label"], category))
    return out


def _mme_answers(root: Path, subtask: str, stem: str) -> tuple[Path, dict[str, str]]:
    """MME's "question<TAB>answer" lines of one image, keyed as convert_answer_to_mme.py's `get_gt`
    keys them (:18-37): `<subtask>/questions_answers_YN/` when `<subtask>/images/` exists, else
    `<subtask>/`; each line stripped, then split at the tab."""
    folder = root / subtask / ("questions_answers_YN" if (root / subtask / "images").is_dir() else "")
    txt = folder / f"{stem}.txt"
    if not txt.is_file():
        raise UserError(f"no MME answer file {txt} for {subtask}/{stem} under {root}")
    pairs = [line.strip().split("\t") for line in read_text(txt, "MME answer file").splitlines() if line.strip()]
    if any(len(p) != 2 for p in pairs):
        raise UserError(f"{txt}: expected 'question<TAB>answer' lines")
    return txt, dict(pairs)


def mme_question(prompt: str, answers: dict[str, str]) -> Optional[str]:
    """The MME question a LLaVA prompt asks, found as convert_answer_to_mme.py:64-69 finds it: drop
    "Answer the question using a single word or phrase." (and strip), append " Please answer yes or
    no." when absent, and if that is not an MME question, the same with two spaces."""
    question = prompt.replace(SHORT_ANSWER, "").strip() if SHORT_ANSWER in prompt else prompt
    if "Please answer yes or no." not in question:
        question += " Please answer yes or no."
        if question not in answers:
            question = question.replace(" Please answer yes or no.", "  Please answer yes or no.")
    return question if question in answers else None


def mme_llava(path: Path, image_dir: Optional[Path], annotations=None) -> list[Example]:
    """LLaVA's `llava_mme.jsonl`; the subtask and answer file come from the question_id
    ("<subtask>/.../<name>.<ext>"), as convert_answer_to_mme.py:56-57 takes them."""
    root = _needs(annotations, "mme", "the MME_Benchmark_release_version folder")
    seen: Counter = Counter()
    out = []
    for n, row in enumerate(_questions(path), 1):
        key = str(row["question_id"])
        subtask, stem = key.split("/")[0], key.split("/")[-1].split(".")[0]
        txt, answers = _mme_answers(root, subtask, stem)
        question = mme_question(row["text"], answers)
        if question is None:
            raise UserError(f"{path}: line {n}: question {row['text']!r} is not among the questions of {txt}")
        seen[key] += 1
        out.append(yes_no_example(f"{path}: line {n}", f"{key}#{seen[key]}", _image(image_dir, row), row["text"],
                                  answers[question], subtask, image_key=key))
    return out


def scienceqa_release(root: Path, image_dir: Optional[Path], split: str = "test") -> list[Example]:
    problems = _json_object(root / "problems.json")
    splits = _json_object(root / "pid_splits.json")
    if split not in splits:
        raise UserError(f"{root / 'pid_splits.json'}: no split {split!r}; splits: {', '.join(splits)}")
    images = image_dir or root / "images" / split
    out = []
    for pid in splits[split]:
        prob = problems.get(pid)
        if not isinstance(prob, dict):
            raise UserError(f"{root / 'problems.json'}: no problem {pid!r} (listed in pid_splits.json)")
        if not prob.get("image"):
            continue  # ScienceQA-IMG: the questions with a picture
        choices, gold = prob.get("choices"), prob.get("answer")
        if not isinstance(choices, list) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise UserError(f"{root / 'problems.json'}: problem {pid}: 'choices' and 'answer' do not name an option")
        hint = f"Context: {prob['hint']}" if prob.get("hint") else None
        out.append(choice_example(f"{root / 'problems.json'}: problem {pid}", pid, str(images / pid / prob["image"]),
                                  prob.get("question", ""), dict(zip(LETTERS, map(str, choices))), LETTERS[gold],
                                  hint, prob.get("subject")))
    if not out:
        raise UserError(f"{root}: no {split} problems with an image")
    return out


LLAVA_READERS = {"vqav2": vqav2_llava, "textvqa": textvqa_llava, "pope": pope_llava, "mme": mme_llava}


def read_llava_task(kind: str, path: str | Path, image_dir: Optional[str] = None, **options) -> list[Example]:
    path, images = Path(path), Path(image_dir) if image_dir else None
    if images is not None and not images.is_dir():
        raise UserError(f"image folder not found: {images}")
    if kind == "scienceqa_img":
        if not (path / "problems.json").is_file():
            raise UserError(f"{path}: no problems.json; give the ScienceQA release folder (problems.json, "
                            "pid_splits.json, images/) or its lmms-lab parquet files")
        return scienceqa_release(path, images, **options)
    if kind not in LLAVA_READERS:
        raise UserError(f"{path}: {kind} is read from its parquet release only")
    return LLAVA_READERS[kind](path, images, **options)

