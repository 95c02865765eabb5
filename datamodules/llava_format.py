"""LLaVA's conversation format, read and written, so the official unlearning files work as they are.

A LLaVA record (the format of LLaVA-665K and of the Safety Mirage release's `train_forget.json` /
`train_retain_mixed.json`; OPTML-Group/VLM-Safety-Unlearn@1f89239 `data/data.md` lines 181-191):
`{"id", "image" (optional: text-only rows have none), "conversations": [{"from": "human", "value":
"<image>question"}, {"from": "gpt", "value": "answer"}, ...]}`.

Reading gives one `Example` per record: its first human -> gpt exchange as instruction / response
(the one the image belongs to in LLaVA data, and all that evaluation and generation use), the later
exchanges as `follow_ups`, which training renders after it and labels as the official trainer does
(the whole conversation one sequence, every gpt turn supervised: `preprocess_v1`,
VLM-Safety-Unlearn@1f89239 llava/train/train_unlearn_full.py lines 429-512, applied to the retain and
forget files alike, lines 739-742 and 794-799). Leading gpt turns are skipped, as `preprocess_v1` skips
one (lines 440-442), and a last human turn with no answer is dropped (there is nothing to supervise). The `<image>`
placeholder is removed from every turn: the collator puts the image in the first user turn the
processor's way. LLaVA files have no safety label, so the caller says which side the rows are
(`safe`), unless a record carries its own `safe` (files this module writes do).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from core.errors import UserError
from core.files import atomic_write
from core.records import read_json_list
from datamodules.examples import Example

IMAGE_TOKEN = "<image>"


def is_llava_file(records: list) -> bool:
    """True if the records are LLaVA conversations (the first record decides; all are then checked)."""
    return bool(records) and isinstance(records[0], dict) and "conversations" in records[0]


def _turns(path: Path, i: int, rec: dict) -> list[dict]:
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                              and t.get("from") in ("human", "gpt") for t in turns):
        raise UserError(f"{path}: record {i} (id={rec.get('id')!r}): 'conversations' must be a list of "
                        "{'from': 'human'|'gpt', 'value': text} turns")
    return turns


def exchanges(path: Path, i: int, rec: dict) -> list[tuple[str, str]]:
    """The (question without `<image>`, answer) exchanges of a LLaVA record, in order."""
    turns = _turns(path, i, rec)
    first = next((k for k, t in enumerate(turns) if t["from"] == "human"), len(turns))
    last = len(turns) - (len(turns) > first and turns[-1]["from"] == "human")  # an unanswered question: out
    turns = turns[first:last]
    if not turns:
        raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has no human turn followed by a gpt turn")
    for k, turn in enumerate(turns):
        if turn["from"] != ("human", "gpt")[k % 2]:
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}): turn {first + k} is from "
                            f"'{turn['from']}' but the turns must alternate human, gpt")
    return [(turns[k]["value"].replace(IMAGE_TOKEN, "").strip(), turns[k + 1]["value"])
            for k in range(0, len(turns), 2)]


def first_exchange(path: Path, i: int, rec: dict) -> tuple[str, str]:
    """(question, answer) of a LLaVA record's first exchange; the whole record is checked."""
    return exchanges(path, i, rec)[0]


def llava_examples(path: str | Path, safe: bool, image_dir: str | Path | None = None,
                   records: Optional[list] = None) -> list[Example]:
    """The examples of a LLaVA-format file (`records` if already read). Image paths are relative
    to `image_dir` (default: the file's folder); a record without `image` is text-only."""
    path = Path(path)
    records = read_json_list(path) if records is None else records
    root = Path(image_dir) if image_dir else path.parent
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise UserError(f"{path}: record {i} is not a LLaVA conversation record (no 'conversations')")
        (question, answer), *follow_ups = exchanges(path, i, rec)
        image = rec.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has a bad 'image': {image!r}")
        row_safe = rec.get("safe", safe)
        if not isinstance(row_safe, bool):
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has a non-boolean 'safe': {row_safe!r}")
        out.append(Example(id=str(rec.get("id", i)), image=str(root / image) if image else None,
                           instruction=question, response=answer, safe=row_safe,
                           subset=rec.get("subset") or ("llava_safe" if row_safe else "llava_unsafe"),
                           category=rec.get("harmful_category"), follow_ups=tuple(follow_ups)))
    return out


def to_llava_record(ex: Example, image_root: Optional[Path] = None, with_safe: bool = True) -> dict:
    """An `Example` as a LLaVA record (`<image>` first in the question when there is an image, as
    OPTML-Group/VLM-Safety-Unlearn@1f89239 `data/split_forget_retain.py` lines 23-24 do)."""
    rec: dict = {"id": ex.id}
    if ex.image:
        rec["image"] = Path(os.path.relpath(ex.image, image_root)).as_posix() if image_root else ex.image
    question = f"{IMAGE_TOKEN}{ex.instruction}" if ex.image else ex.instruction
    rec["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": ex.response or ""}]
    for later_question, answer in ex.follow_ups:
        rec["conversations"] += [{"from": "human", "value": later_question}, {"from": "gpt", "value": answer}]
    if with_safe:
        rec["safe"] = ex.safe
    if ex.subset:
        rec["subset"] = ex.subset
    return rec


def write_llava(path: str | Path, records: list[dict]) -> None:
    atomic_write(path, json.dumps(records, indent=2, ensure_ascii=False), what="LLaVA-format file")
