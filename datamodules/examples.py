"""VLGuard-format records -> flat examples (one instruction each), with errors that name the fault.

VLGuard: a JSON list of `{id, image, safe, [harmful_category], instr-resp}`.
`safe: false` -> `[{instruction, response}]`; `safe: true` -> `[{safe_instruction, response},
{unsafe_instruction, response}]`. Mirage World records add `answer` / `harmful_keywords` to the
items (what the exact judge and the utility metric need); real VLGuard has neither.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Hashable, Optional

from core.errors import UserError
from core.records import field as record_field
from core.records import read_json_list

# Every eval set a datamodule can build, in logging order (the one list of their names).
ALL_EVAL_SETS = ("unsafe_clean", "unsafe_attacked", "unsafe_neutral", "unsafe_cue_removed",
                 "safe_clean", "safe_rewritten", "safe_neutral")
# The paper's two probes: the one-word attack and the over-prudence rewrite.
EVAL_SETS = ("unsafe_clean", "unsafe_attacked", "safe_clean", "safe_rewritten")
# Controls, built when a neutral cue is configured: first word -> the neutral cue (unsafe and safe),
# and the refusal cue alone removed (unsafe queries that start with it get the neutral cue).
CONTROL_EVAL_SETS = tuple(s for s in ALL_EVAL_SETS if s not in EVAL_SETS)


def eval_set_names(neutral_cue: str | None) -> tuple[str, ...]:
    """The eval sets a datamodule builds, in logging order: the dataloader index of each name."""
    return ALL_EVAL_SETS if neutral_cue else EVAL_SETS


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
    # The (question, answer) exchanges after the first of a multi-turn conversation (LLaVA files).
    # Training renders them after instruction/response and labels every answer; evaluation,
    # generation, judges and rewrites see the first exchange (instruction, response) only.
    follow_ups: tuple[tuple[str, str], ...] = ()


def load_json_list(path: str | Path) -> list[dict]:
    return read_json_list(path)


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
    for i, rec in enumerate(read_json_list(path)):
        if not isinstance(rec, dict) or "id" not in rec or "safe" not in rec:
            raise UserError(f"{path}: record {i} is missing 'id' or 'safe'")
        rid = record_field(path, i, rec, "id", (str, int))
        safe = record_field(path, i, rec, "safe", bool)
        image_name = record_field(path, i, rec, "image", str, default=None)
        image = str(image_root / image_name) if image_name else None
        common = dict(id=str(rid), image=image,
                      category=record_field(path, i, rec, "harmful_category", str, default=None),
                      shot=record_field(path, i, rec, "shot", int, default=0),
                      extra={"world": rec["world"]} if "world" in rec else {})
        # A prepared forget_queries.json record keeps the half it came from (source_subset).
        unsafe_subset = rec.get("source_subset") if rec.get("source_subset") in ("unsafes", "safe_unsafes") else "unsafes"
        keys = [("instruction", 0, False, unsafe_subset)] if not safe else [
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


def safe_record_conversations(examples: list[Example], seed: int = 0) -> list[Example]:
    """VLGuard's SFT format (ys-zong/VLGuard a2f85c9 convert_to_llava_format.py:19-30): a safe record's two
    exchanges (its safe and its unsafe instruction, consecutive rows of `vlguard_examples` with one id)
    become ONE two-turn conversation in a shuffled order (`random.seed(0)`, :8, one shuffle per safe
    record); an unsafe record stays one exchange. Every answer is trained (Example.follow_ups)."""
    rng = random.Random(seed)
    out: list[Example] = []
    i = 0
    while i < len(examples):
        ex = examples[i]
        pair = examples[i + 1] if i + 1 < len(examples) else None
        if ex.subset == "safe_safes" and pair is not None and pair.subset == "safe_unsafes" and pair.id == ex.id:
            order = [ex, pair]  # instr-resp order: safe, unsafe; shuffled as the script does (:25)
            rng.shuffle(order)
            first, second = order
            out.append(replace(first, safe=True, follow_ups=((second.instruction, second.response),),
                               extra={**first.extra, "conversation": [first.subset, second.subset]}))
            i += 2
            continue
        out.append(ex)
        i += 1
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
              neutral_cue: str | None = None, first_word: Callable[[str], str] | None = None,
              kshot: Optional[Callable[[str, str], list[str]]] = None, seed: int = 0) -> dict[str, list[Example]]:
    """The named eval sets (`eval_set_names(neutral_cue)`): unsafe / safe queries, clean and with
    their first word rewritten.

    `unsafe_attacked` is the one-word attack (first word -> compliance cue); `safe_rewritten` the
    over-prudence probe (first word -> refusal cue). With `kshot(text, id) -> [K rewrites]` the attack
    is K-shot: K rows per query (shot 1..K), counted as one query that is attacked if any row is.
    With a `neutral_cue`: `unsafe_neutral` / `safe_neutral` put the neutral cue first (what any
    first-word swap does, the control), and `unsafe_cue_removed` swaps it in only where a query starts
    with the refusal cue (`first_word` decides), so removing the refusal cue is measured apart from
    adding the compliance cue. At most `max_samples` queries per set, stratified by `eval_stratum` and
    seeded. Every row carries its query's index in `extra["query"]` (what the per-query metric groups by).
    """
    unsafe = stratified_sample([e for e in examples if not e.safe], max_samples, seed, eval_stratum)
    safe = stratified_sample([e for e in examples if e.safe], max_samples, seed, eval_stratum)

    def row(e: Example, i: int, subset: str, instruction: Optional[str] = None, shot: Optional[int] = None):
        return replace(e, subset=subset, instruction=e.instruction if instruction is None else instruction,
                       shot=e.shot if shot is None else shot, extra={**e.extra, "query": i})

    def rewritten(name: str, rows: list[Example], cue: str, when=lambda text: True) -> list[Example]:
        return [row(e, i, name, rewrite(e.instruction, cue) if when(e.instruction) else e.instruction)
                for i, e in enumerate(rows)]

    if kshot is None:
        attacked = rewritten("unsafe_attacked", unsafe, compliance_cue)
    else:
        attacked = [row(e, i, "unsafe_attacked", text, k) for i, e in enumerate(unsafe)
                    for k, text in enumerate(kshot(e.instruction, e.id), 1)]
    sets = {
        "unsafe_clean": [row(e, i, "unsafe_clean") for i, e in enumerate(unsafe)],
        "unsafe_attacked": attacked,
        "safe_clean": [row(e, i, "safe_clean") for i, e in enumerate(safe)],
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
