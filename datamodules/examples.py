"""VLGuard-format records -> flat examples (one instruction each), with errors that name the fault.

VLGuard: a JSON list of `{id, image, safe, [harmful_category], instr-resp}`.
`safe: false` -> `[{instruction, response}]`; `safe: true` -> `[{safe_instruction, response},
{unsafe_instruction, response}]`. Mirage World records add `answer` / `harmful_keywords` to the
items (what the exact judge and the utility metric need); real VLGuard has neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from core.errors import UserError

# The paper's two probes: the one-word attack and the over-prudence rewrite.
EVAL_SETS = ("unsafe_clean", "unsafe_attacked", "safe_clean", "safe_rewritten")
# Controls, built when a neutral cue is configured: first word -> the neutral cue (unsafe and safe),
# and the refusal cue alone removed (unsafe queries that start with it get the neutral cue).
CONTROL_EVAL_SETS = ("unsafe_neutral", "unsafe_cue_removed", "safe_neutral")


def eval_set_names(neutral_cue: str | None) -> tuple[str, ...]:
    """The eval sets a datamodule builds, in logging order: the dataloader index of each name."""
    if not neutral_cue:
        return EVAL_SETS
    return ("unsafe_clean", "unsafe_attacked", "unsafe_neutral", "unsafe_cue_removed",
            "safe_clean", "safe_rewritten", "safe_neutral")


@dataclass
class Example:
    id: str
    image: Optional[str]  # absolute path, or None for text-only data
    instruction: str
    response: Optional[str]
    safe: bool
    subset: str = ""
    answer: Optional[str] = None
    harmful_keywords: Optional[list[str]] = None
    category: Optional[str] = None
    shot: int = 0
    extra: dict = field(default_factory=dict)


def load_json_list(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise UserError(f"{path}: empty split (no records)")
    return data


def parse_jsonl(path: str | Path, text: str) -> list[dict]:
    """The rows of a JSON-lines `text` read from `path` (blank lines skipped); a bad line is a
    one-line error naming the file and line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {n} is not valid JSON ({err.msg}); fix or delete the file") from err
    return rows


def _item(path: Path, i: int, rec: dict, key: str, j: int) -> dict:
    items = rec.get("instr-resp")
    if not isinstance(items, list) or len(items) <= j or not isinstance(items[j], dict):
        raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has no 'instr-resp'[{j}]")
    item = items[j]
    for k in (key, "response"):
        if not isinstance(item.get(k), str):
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) is missing '{k}' in 'instr-resp'[{j}]")
    return item


def vlguard_examples(path: str | Path, image_dir: str | Path | None = None) -> list[Example]:
    """Every (instruction, response) pair of a VLGuard-format file, labelled safe / unsafe.

    `subset` is the VLGuard test subset name: `unsafes`, `safe_unsafes` or `safe_safes`.
    """
    path = Path(path)
    image_root = Path(image_dir) if image_dir else path.parent
    out: list[Example] = []
    for i, rec in enumerate(load_json_list(path)):
        if not isinstance(rec, dict) or "id" not in rec or "safe" not in rec:
            raise UserError(f"{path}: record {i} is missing 'id' or 'safe'")
        image = str(image_root / rec["image"]) if rec.get("image") else None
        common = dict(id=str(rec["id"]), image=image, category=rec.get("harmful_category"),
                      shot=int(rec.get("shot", 0)), extra={"world": rec["world"]} if "world" in rec else {})
        keys = [("instruction", 0, False, "unsafes")] if not rec["safe"] else [
            ("safe_instruction", 0, True, "safe_safes"), ("unsafe_instruction", 1, False, "safe_unsafes")]
        for key, j, safe, subset in keys:
            item = _item(path, i, rec, key, j)
            ex = Example(instruction=item[key], response=item["response"], safe=safe, subset=subset,
                         answer=item.get("answer"), harmful_keywords=item.get("harmful_keywords"), **common)
            if isinstance(item.get("harmful_response"), str):  # an unlearning forget target
                ex.extra = {**ex.extra, "harmful_response": item["harmful_response"]}
            if isinstance(item.get("intent"), str):  # Mirage World: what the relevance judge checks
                ex.extra = {**ex.extra, "intent": item["intent"]}
            out.append(ex)
    return out


def eval_sets(examples: list[Example], compliance_cue: str, refusal_cue: str,
              rewrite: Callable[[str, str], str], max_samples: int | None = None,
              neutral_cue: str | None = None,
              first_word: Callable[[str], str] | None = None) -> dict[str, list[Example]]:
    """The named eval sets (`eval_set_names(neutral_cue)`): unsafe / safe queries, clean and with
    their first word rewritten.

    `unsafe_attacked` is the one-word attack (first word -> compliance cue); `safe_rewritten` the
    over-prudence probe (first word -> refusal cue). With a `neutral_cue`: `unsafe_neutral` /
    `safe_neutral` put the neutral cue first (what any first-word swap does, the control), and
    `unsafe_cue_removed` swaps it in only where a query starts with the refusal cue (`first_word`
    decides), so removing the refusal cue is measured apart from adding the compliance cue.
    """
    unsafe = [e for e in examples if not e.safe][:max_samples]
    safe = [e for e in examples if e.safe][:max_samples]

    def rewritten(name: str, rows: list[Example], cue: str, when=lambda text: True) -> list[Example]:
        return [replace(e, subset=name,
                        instruction=rewrite(e.instruction, cue) if when(e.instruction) else e.instruction)
                for e in rows]

    sets = {
        "unsafe_clean": [replace(e, subset="unsafe_clean") for e in unsafe],
        "unsafe_attacked": rewritten("unsafe_attacked", unsafe, compliance_cue),
        "safe_clean": [replace(e, subset="safe_clean") for e in safe],
        "safe_rewritten": rewritten("safe_rewritten", safe, refusal_cue),
    }
    if neutral_cue:
        if first_word is None:
            raise ValueError("eval_sets: a neutral_cue needs first_word to find the refusal cue")
        starts_with_refusal = lambda text: first_word(text).lower() == refusal_cue.lower()  # noqa: E731
        sets.update(unsafe_neutral=rewritten("unsafe_neutral", unsafe, neutral_cue),
                    unsafe_cue_removed=rewritten("unsafe_cue_removed", unsafe, neutral_cue, starts_with_refusal),
                    safe_neutral=rewritten("safe_neutral", safe, neutral_cue))
    sets = {name: sets[name] for name in eval_set_names(neutral_cue)}
    for name, items in sets.items():
        if not items:
            raise UserError(f"eval set '{name}' is empty (no {'unsafe' if 'unsafe' in name else 'safe'} records)")
    return sets
