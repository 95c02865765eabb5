"""The Safety Mirage forget / retain pipeline, step by step as the official code does it
(OPTML-Group/VLM-Safety-Unlearn@1f89239, `data/data.md` "Overview", lines 11-31), from a prepared
VLGuard directory (`python -m datamodules.vlguard prepare`):

1. forget queries: the `safe=False` records ("unsafes", `data/split_forget_retain.py` lines 51-59);
   `halves="both"` adds the unsafe instruction of safe records (the commented-out block, lines 70-77);
2. several generators' answers per query (`data/data.md` lines 45-50: LLaVA-1.5 7B, 7B-LoRA, 13B,
   13B-LoRA), the most harmful one picked by a judge LLM with the official prompt
   (`data/select_harmful_responses.py` lines 50-67), or, with no judge, the first answer that is not a
   keyword refusal (this project's fallback; a query every generator refused is dropped);
3. retain = the safe instructions of safe records with their answers (`split_forget_retain.py` lines
   60-68), topped up to `target_size` (2000, `data/mix_retain_data.py` line 22) with records drawn from
   a general LLaVA-format file, seeded (42, line 23), the combined list shuffled (lines 32-36);
4. the RMU forget file: every gpt turn appended to the human turn after "\\n" (`data/format_rmu_forget.py`
   lines 19-37).

The outputs are LLaVA-format files named as the official ones (`data/data.md` lines 166-175):
`train_forget.json`, `train_retain_mixed.json`, `train_forget_qa_full.json`, with absolute image
paths so that they read the same from any data.image_dir.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from core.errors import UserError
from core.files import atomic_write
from core.records import read_json_list, read_text
from core.refusal import is_refusal
from datamodules.examples import Example, vlguard_examples
from datamodules.llava_format import (
    IMAGE_TOKEN,
    first_exchange,
    is_llava_file,
    to_llava_record,
    write_llava,
)

HALVES = ("unsafes", "both")
TARGET_SIZE = 2000  # data/mix_retain_data.py line 22
SEED = 42  # data/mix_retain_data.py line 23
# The judge's prompt, verbatim: data/select_harmful_responses.py lines 50-67.
JUDGE_SYSTEM = ("You are an expert in evaluating the harmfulness and sensitivity of textual responses. "
                "Your task is to analyze multiple answers provided for an image and select the one "
                "that is most harmful or sensitive.")
Judge = Callable[[list[dict]], str]  # a chat conversation -> the judge's reply


def judge_conversation(image: str, answers: list[str]) -> list[dict]:
    """The official selection conversation for one query's candidate answers."""
    user = (f"For the image '{image}', here are several responses:\n"
            + "\n".join(f"{i + 1}. {ans}" for i, ans in enumerate(answers))
            + "\n\nPlease respond with only the number corresponding to the most harmful answer.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_choice(raw: str, n: int) -> Optional[int]:
    """The judge's 0-based choice: the first number in its reply (the official rule, lines 94-105), or
    None when there is none in 1..n. The official parser then silently takes answer 1; here the caller
    falls back to the keyword rule for that query and counts it, so a broken judge shows in the report."""
    match = re.search(r"\d+", raw)
    if match is None or not 1 <= int(match.group()) <= n:
        return None
    return int(match.group()) - 1


def first_non_refusal(answers: list[str], refusal_preset: str = "vlguard") -> Optional[int]:
    """The keyword rule: the first answer that is not a refusal (None if all refuse)."""
    return next((i for i, a in enumerate(answers) if not is_refusal(a, refusal_preset)), None)


def judge_choice(judge: Judge, image: str, answers: list[str]) -> Optional[int]:
    """The most harmful of `answers` by the judge (0-based; None: its reply named none of them)."""
    if len(answers) == 1:
        return 0
    return parse_choice(judge(judge_conversation(image, answers)), len(answers))


def image_label(ex: Example) -> str:
    """How the official prompt names the image: VLGuard's `source/file` (the query id without one)."""
    return "/".join(Path(ex.image).parts[-2:]) if ex.image else ex.id


# -- inputs -----------------------------------------------------------------------------------------
def forget_queries(train_file: Path, halves: str = "unsafes") -> list[Example]:
    """The unsafe queries of a VLGuard training file (image paths absolute)."""
    if halves not in HALVES:
        raise UserError(f"unknown halves '{halves}'; choose one of: {', '.join(HALVES)}")
    subsets = {"unsafes"} if halves == "unsafes" else {"unsafes", "safe_unsafes"}
    return [ex for ex in vlguard_examples(train_file) if not ex.safe and ex.subset in subsets]


def read_answers(path: Path) -> dict[str, str]:
    """One generator's answers: the official `{image_path: response}` JSON (`data/data.md` lines 45-50)
    or a VLGuard-format list (a harvest cache), keyed by image path, or `id/instruction` for records."""
    text = read_text(path, "answers file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if isinstance(data, dict):
        bad = next((k for k, v in data.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise UserError(f"{path}: the answer for {bad!r} is not a string")
        return {Path(k).as_posix(): v for k, v in data.items()}
    return {f"{ex.id}/{ex.instruction}": ex.response or "" for ex in vlguard_examples(path)}


def _answer_for(ex: Example, answers: dict[str, str]) -> Optional[str]:
    key = f"{ex.id}/{ex.instruction}"
    if key in answers:
        return answers[key]
    image = Path(ex.image).as_posix() if ex.image else ""
    # Official files key by the image path as written in VLGuard's train.json (e.g. "bad_ads/x.png"),
    # a suffix of the prepared directory's path.
    return next((v for k, v in answers.items() if image == k or image.endswith("/" + k)), None)


def harmful_forget(queries: list[Example], answer_files: list[Path], judge: Optional[Judge],
                   refusal_preset: str = "vlguard") -> tuple[list[Example], dict]:
    """(forget rows with the selected harmful answer, report). A query that a generator did not
    answer is an error naming the file and the query (the generators must answer the same queries)."""
    if not answer_files:
        raise UserError("no answers files: give one per generator model (--answers A.json B.json ...)")
    per_file = [(p, read_answers(p)) for p in answer_files]
    # In unsafes, each image has one query: the image path keys it. Both halves share images, so then
    # an official {image: answer} file is ambiguous and only id/instruction-keyed files are accepted.
    rows, dropped, unparsed = [], 0, 0
    for ex in queries:
        answers = []
        for path, table in per_file:
            answer = _answer_for(ex, table)
            if answer is None:
                raise UserError(f"{path}: no answer for query id={ex.id} ({ex.image}); every answers file "
                                "must answer every forget query")
            answers.append(answer)
        choice = judge_choice(judge, image_label(ex), answers) if judge else None
        if judge and choice is None:
            unparsed += 1
        if choice is None:
            choice = first_non_refusal(answers, refusal_preset)
        if choice is None:
            dropped += 1
            continue
        rows.append(replace(ex, response=answers[choice]))
    report = {"queries": len(queries), "generators": len(answer_files), "kept": len(rows),
              "dropped_all_refused": dropped, "selection": "judge" if judge else "first non-refusal",
              "judge_unparsed": unparsed}
    if unparsed:
        print(f"warning: the judge named no answer for {unparsed} of {len(queries)} queries: the first "
              "non-refusal was taken there")
    return rows, report


def general_records(path: Path, keep: Optional[Callable[[dict], bool]] = None) -> list[dict]:
    """A LLaVA-format general file's records (multi-turn and text-only rows kept whole), those that
    `keep` rejects (a safety filter) left out."""
    records = read_json_list(path)
    if not is_llava_file(records):
        raise UserError(f"{path}: not a LLaVA conversation file (record 0 has no 'conversations')")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i} is not an object")
        first_exchange(path, i, rec)  # every record checked before any is used
    image_root = path.parent
    out = []
    for rec in records:
        if keep is None or keep(rec):
            rec = dict(rec, safe=True)
            if rec.get("image"):
                rec["image"] = str((image_root / rec["image"]).resolve())
            out.append(rec)
    return out


def blocklist_filter(words: list[str]) -> Callable[[dict], bool]:
    """A safety filter: keep a record unless a turn contains one of `words` (case-insensitive)."""
    lowered = [w.lower() for w in words if w.strip()]
    return lambda rec: not any(w in t["value"].lower() for t in rec["conversations"] for w in lowered)


def mixed_retain(retain: list[dict], general: list[dict], target_size: int = TARGET_SIZE,
                 seed: int = SEED) -> list[dict]:
    """data/mix_retain_data.py lines 32-36: draw what is missing to `target_size`, shuffle the union."""
    rng = random.Random(seed)
    sampled = rng.sample(general, min(max(0, target_size - len(retain)), len(general)))
    combined = retain + sampled
    rng.shuffle(combined)
    return combined


def merge_qa(rec: dict) -> dict:
    """data/format_rmu_forget.py lines 19-37: every gpt turn appended to the first human turn."""
    turns = [dict(t) for t in rec["conversations"]]
    human = next((i for i, t in enumerate(turns) if t["from"] == "human"), None)
    answer = "\n".join(t["value"] for t in turns if t["from"] == "gpt")
    if human is not None and answer:
        turns[human]["value"] = f"{turns[human]['value']}\n{answer}"
    return {**rec, "conversations": turns}


# -- the whole pipeline -----------------------------------------------------------------------------
def build(train_file: Path, retain_file: Path, out: Path, answer_files: list[Path],
          general_file: Optional[Path] = None, judge: Optional[Judge] = None, halves: str = "unsafes",
          target_size: int = TARGET_SIZE, seed: int = SEED, keep: Optional[Callable[[dict], bool]] = None,
          refusal_preset: str = "vlguard") -> dict:
    """Write train_forget.json, train_forget_qa_full.json, train_retain_mixed.json (and
    build_report.json) into `out`; returns the report."""
    forget, report = harmful_forget(forget_queries(train_file, halves), answer_files, judge, refusal_preset)
    if not forget:
        raise UserError(f"no forget rows: every generator refused all {report['queries']} queries")
    forget_recs = [to_llava_record(ex) for ex in forget]
    retain_recs = [to_llava_record(ex) for ex in vlguard_examples(retain_file) if ex.safe]
    if not retain_recs:
        raise UserError(f"{retain_file}: no safe rows to retain")
    general = general_records(general_file, keep) if general_file else []
    if len(retain_recs) + len(general) < target_size:
        print(f"warning: {len(retain_recs)} retain rows + {len(general)} general rows < target {target_size}")
    mixed = mixed_retain(retain_recs, general, target_size, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_llava(out / "train_forget.json", forget_recs)
    write_llava(out / "train_forget_qa_full.json", [merge_qa(r) for r in forget_recs])
    write_llava(out / "train_retain_mixed.json", mixed)
    report.update(retain_vlguard=len(retain_recs), retain_general=len(mixed) - len(retain_recs),
                  retain=len(mixed), halves=halves, target_size=target_size, seed=seed,
                  image_token=IMAGE_TOKEN, files=["train_forget.json", "train_forget_qa_full.json",
                                                  "train_retain_mixed.json"])
    atomic_write(out / "build_report.json", json.dumps(report, indent=1), what="pipeline report")
    return report
