"""Read instruction records in VLGuard or LLaVA-conversation format.

Both formats reduce to one stream of ``(record_id, instruction, label, item_key)`` so the
audit and the attacks never branch on the file format themselves.

Labels in LLaVA files: a ``safe`` key on the record wins (VLGuard exports keep it); without
one we look at the first ``gpt`` reply and call the instruction "unsafe" when that reply is
a refusal. That matches how a safety set encodes its label (refusal target = unsafe query),
and it is a deliberately small keyword list, not the full evaluation preset of metrics.refusal;
pass ``label_fn`` for anything smarter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from core.errors import UserError
from core.records import read_json_list
from core.refusal import is_refusal

# The three instruction keys VLGuard uses inside ``instr-resp`` items.
VLGUARD_KEYS = ("instruction", "safe_instruction", "unsafe_instruction")

def looks_like_refusal(text: str) -> bool:
    """Label LLaVA records that carry no ``safe`` key: the ``strict`` refusal preset (the declining
    phrases only, so a compliant answer that mentions "legally" is not mislabelled)."""
    return is_refusal(text, "strict")


def _record_problem(rec, i: int) -> str | None:
    """Return why a record is unusable, or None. Checked eagerly so errors name the file."""
    if not isinstance(rec, dict):
        return f"record {i} is a {type(rec).__name__}, not an object"
    where = f"record {i} (id {rec.get('id', '?')!r})"
    if "instr-resp" in rec:
        items = rec["instr-resp"]
        if not isinstance(items, list) or not items:
            return f"{where}: 'instr-resp' must be a non-empty list"
        for j, item in enumerate(items):
            if not isinstance(item, dict) or not any(k in item for k in VLGUARD_KEYS):
                return f"{where}: instr-resp[{j}] has none of the keys {', '.join(VLGUARD_KEYS)}"
        return None
    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not any(
            isinstance(t, dict) and t.get("from") == "human" for t in conv
        ):
            return f"{where}: 'conversations' has no human turn"
        return None
    return f"{where} has neither 'instr-resp' nor 'conversations'"


def load_records(path) -> list[dict]:
    """Load and validate a JSON list of records; every problem is a one-line ValueError."""
    path = Path(path)
    try:
        data = read_json_list(path)
    except UserError as err:  # this package's callers expect ValueError
        raise ValueError(str(err)) from None
    for i, rec in enumerate(data):
        problem = _record_problem(rec, i)
        if problem:
            raise ValueError(f"{path}: {problem}")
    return data


def _label_from_safe(value) -> str:
    """Accept the bool VLGuard uses and the obvious string spellings."""
    if isinstance(value, str):
        value = value.strip().lower() in ("true", "safe", "1", "yes")
    return "safe" if value else "unsafe"


def _llava_label(rec: dict, label_fn: Callable[[dict], str] | None) -> str:
    if "safe" in rec:
        return _label_from_safe(rec["safe"])
    if label_fn is not None:
        return label_fn(rec)
    reply = next((t.get("value", "") for t in rec["conversations"] if t.get("from") == "gpt"), "")
    return "unsafe" if looks_like_refusal(reply) else "safe"


def iter_instructions(
    records, label_fn: Callable[[dict], str] | None = None
) -> Iterator[tuple[str, str, str, str]]:
    """Yield ``(record_id, instruction, label, item_key)`` for every instruction.

    ``item_key`` says where the text lives: one of VLGUARD_KEYS, or ``"conversations"``.
    In VLGuard a plain ``instruction`` takes the record's ``safe`` flag; the paired keys
    carry their own label whatever the record says.
    """
    for i, rec in enumerate(records):
        problem = _record_problem(rec, i)
        if problem:
            raise ValueError(problem)
        rid = str(rec.get("id", i))
        if "instr-resp" in rec:
            for item in rec["instr-resp"]:
                for key in VLGUARD_KEYS:
                    if key in item:
                        if key == "instruction":
                            label = _label_from_safe(rec.get("safe", False))
                        else:
                            label = "safe" if key == "safe_instruction" else "unsafe"
                        yield rid, str(item[key]), label, key
        else:
            first = next(t for t in rec["conversations"] if t.get("from") == "human")
            text = str(first.get("value", "")).replace("<image>", "").strip()
            yield rid, text, _llava_label(rec, label_fn), "conversations"
