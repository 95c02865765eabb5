"""LLaVA's conversation format, read and written, so the official unlearning files work as they are.

A LLaVA record (the format of LLaVA-665K and of the Safety Mirage release's `train_forget.json` /
`train_retain_mixed.json`; OPTML-Group/VLM-Safety-Unlearn@1f89239 `data/data.md` lines 181-191):
`{"id", "image" (optional: text-only rows have none), "conversations": [{"from": "human", "value":
"<image>question"}, {"from": "gpt", "value": "answer"}, ...]}`.

Reading gives one `Example` per record: its first human -> gpt exchange (the one the image belongs to
in LLaVA data; the later turns of a multi-turn row are follow-ups that an `Example`, one question and
one answer, cannot hold -- they are dropped and counted). The `<image>` placeholder is removed: the
collator inserts the image the processor's way. LLaVA files have no safety label, so the caller says
which side the rows are (`safe`), unless a record carries its own `safe` (files this module writes do).
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


def first_exchange(path: Path, i: int, rec: dict) -> tuple[str, str, int]:
    """(question without `<image>`, answer, number of turns dropped) of a LLaVA record."""
    turns = _turns(path, i, rec)
    q = next((k for k, t in enumerate(turns) if t["from"] == "human"), None)
    if q is None or q + 1 >= len(turns) or turns[q + 1]["from"] != "gpt":
        raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has no human turn followed by a gpt turn")
    question = turns[q]["value"].replace(IMAGE_TOKEN, "").strip()
    return question, turns[q + 1]["value"], len(turns) - 2


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
        question, answer, dropped = first_exchange(path, i, rec)
        image = rec.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has a bad 'image': {image!r}")
        row_safe = rec.get("safe", safe)
        if not isinstance(row_safe, bool):
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has a non-boolean 'safe': {row_safe!r}")
        extra = {"dropped_turns": dropped} if dropped else {}
        out.append(Example(id=str(rec.get("id", i)), image=str(root / image) if image else None,
                           instruction=question, response=answer, safe=row_safe,
                           subset=rec.get("subset") or ("llava_safe" if row_safe else "llava_unsafe"),
                           category=rec.get("harmful_category"), extra=extra))
    return out


def to_llava_record(ex: Example, image_root: Optional[Path] = None, with_safe: bool = True) -> dict:
    """An `Example` as a LLaVA record (`<image>` first in the question when there is an image, as
    OPTML-Group/VLM-Safety-Unlearn@1f89239 `data/split_forget_retain.py` lines 23-24 do)."""
    rec: dict = {"id": ex.id}
    if ex.image:
        rec["image"] = Path(os.path.relpath(ex.image, image_root)).as_posix() if image_root else ex.image
    question = f"{IMAGE_TOKEN}{ex.instruction}" if ex.image else ex.instruction
    rec["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": ex.response or ""}]
    if with_safe:
        rec["safe"] = ex.safe
    if ex.subset:
        rec["subset"] = ex.subset
    return rec


def write_llava(path: str | Path, records: list[dict]) -> None:
    atomic_write(path, json.dumps(records, indent=2, ensure_ascii=False), what="LLaVA-format file")
