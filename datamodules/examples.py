"""VLGuard-format records -> flat examples (one instruction each), with errors that name the fault.

VLGuard (DESIGN §3): a JSON list of `{id, image, safe, [harmful_category], instr-resp}`.
`safe: false` -> `[{instruction, response}]`; `safe: true` -> `[{safe_instruction, response},
{unsafe_instruction, response}]`. Mirage World records add `answer` / `harmful_keywords` to the
items (what the exact judge and the utility metric need); real VLGuard has neither.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Hashable, Optional

from core.errors import UserError

EVAL_SETS = ("unsafe_clean", "unsafe_attacked", "safe_clean", "safe_rewritten")


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
            if isinstance(item.get("harmful_response"), str):  # an unlearning forget target (DESIGN §3)
                ex.extra = {**ex.extra, "harmful_response": item["harmful_response"]}
            out.append(ex)
    return out


def stratified_sample(examples: list[Example], n: Optional[int], seed: int,
                      key: Callable[[Example], Hashable]) -> list[Example]:
    """At most `n` examples, each stratum (`key`) represented in proportion to its size (largest
    remainder), drawn with a seeded generator; the chosen rows keep their file order."""
    if n is None or n >= len(examples):
        return list(examples)
    strata: dict[Hashable, list[int]] = {}
    for i, ex in enumerate(examples):
        strata.setdefault(key(ex), []).append(i)
    order = sorted(strata, key=str)
    quota = {k: n * len(strata[k]) / len(examples) for k in order}
    count = {k: int(quota[k]) for k in order}
    for k in sorted(order, key=lambda k: count[k] - quota[k])[: n - sum(count.values())]:
        count[k] += 1  # the largest remainders get the rows left over (stable sort: ties by key)
    rng = random.Random(seed)
    chosen = sorted(i for k in order for i in rng.sample(strata[k], count[k]))
    return [examples[i] for i in chosen]


def eval_stratum(ex: Example) -> tuple:
    """Stratum of an eval query: VLGuard subset, harmful category and image source (the image's folder)."""
    return ex.subset, ex.category or "", Path(ex.image).parent.name if ex.image else ""


def eval_sets(examples: list[Example], compliance_cue: str, refusal_cue: str,
              rewrite: Callable[[str, str], str], max_samples: int | None = None, *,
              kshot: Optional[Callable[[str, str], list[str]]] = None, seed: int = 0) -> dict[str, list[Example]]:
    """The four validation sets: unsafe / safe queries, clean and with their first word rewritten.

    `unsafe_attacked` is the one-word attack (first word -> compliance cue); `safe_rewritten` the
    over-prudence probe (first word -> refusal cue). With `kshot(text, id) -> [K rewrites]` the attack
    is K-shot: K rows per query (shot 1..K), counted as one query that is attacked if any row is.
    At most `max_samples` queries per set, stratified by `eval_stratum` and seeded. Every row carries
    its query's index in `extra["query"]` (what the per-query metric groups by).
    """
    unsafe = stratified_sample([e for e in examples if not e.safe], max_samples, seed, eval_stratum)
    safe = stratified_sample([e for e in examples if e.safe], max_samples, seed, eval_stratum)

    def row(e: Example, i: int, subset: str, instruction: Optional[str] = None, shot: Optional[int] = None):
        return replace(e, subset=subset, instruction=e.instruction if instruction is None else instruction,
                       shot=e.shot if shot is None else shot, extra={**e.extra, "query": i})

    if kshot is None:
        attacked = [row(e, i, "unsafe_attacked", rewrite(e.instruction, compliance_cue)) for i, e in enumerate(unsafe)]
    else:
        attacked = [row(e, i, "unsafe_attacked", text, k) for i, e in enumerate(unsafe)
                    for k, text in enumerate(kshot(e.instruction, e.id), 1)]
    sets = {
        "unsafe_clean": [row(e, i, "unsafe_clean") for i, e in enumerate(unsafe)],
        "unsafe_attacked": attacked,
        "safe_clean": [row(e, i, "safe_clean") for i, e in enumerate(safe)],
        "safe_rewritten": [row(e, i, "safe_rewritten", rewrite(e.instruction, refusal_cue)) for i, e in enumerate(safe)],
    }
    for name, items in sets.items():
        if not items:
            raise UserError(f"eval set '{name}' is empty (no {'unsafe' if 'unsafe' in name else 'safe'} records)")
    return sets
