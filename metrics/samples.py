"""The `samples.jsonl` file that `fit` (test split) and `evaluate` both write: one generation a line,
in the schema of `metrics.classify.SAMPLE_FIELDS`, keyed by (set, id, subset, shot, prompt)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from core.errors import UserError
from core.files import append_lines, atomic_write, read_lines
from datamodules.examples import Example

SAMPLES = "samples.jsonl"
KEY = ("set", "id", "subset", "shot", "prompt")


def sample_key(set_name: str, rid: str, subset: str, shot: int, prompt: str) -> tuple:
    return (set_name, str(rid), subset, int(shot), prompt)


def example_key(ex: Example) -> tuple:
    return sample_key(ex.extra["set"], ex.id, ex.subset, ex.shot, ex.instruction)


def record_key(row: dict) -> tuple:
    return sample_key(*(row[k] for k in KEY))


def read_samples(path: Path, repair: bool = True, check: bool = True) -> list[dict]:
    """The generations written so far. A line cut by an interruption is dropped with a warning (with
    `repair`, also from the file: the run that resumes regenerates it). With `check`, a line that
    is not a sample (another tool's note, a foreign file) is one line naming the file and line."""
    rows = []
    for n, line in read_lines(path, what="samples", repair=repair):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A half line from a crash, closed by the next append: its generation is simply redone.
            warnings.warn(f"{path}: line {n} is cut short (an interrupted write); it is ignored", stacklevel=2)
            continue
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {n} is a {type(row).__name__}, not a JSON object; remove the line "
                            "or the file")
        missing = [k for k in KEY if k not in row]
        if check and missing:
            raise UserError(f"{path}: line {n} is not a sample of fit or evaluate (it has no "
                            f"{', '.join(repr(k) for k in missing)}); remove the line or the file")
        rows.append(row)
    return rows


def append_samples(path: Path, rows: list[dict]) -> None:
    """Whole lines, fsynced (the point of the file: what was generated survives a crash)."""
    append_lines(path, [json.dumps(r, ensure_ascii=False) for r in rows], what="samples")


def write_samples(path: Path, rows: list[dict]) -> None:
    """All rows, atomically: a reader never sees a half-written file (a full disk: one line)."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), what="samples")
