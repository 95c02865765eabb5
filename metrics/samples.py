"""The `samples.jsonl` file that `fit` (test split) and `evaluate` both write: one generation a line,
in the schema of `metrics.classify.SAMPLE_FIELDS`, keyed by (set, id, subset, shot, prompt)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.files import atomic_write
from core.records import decode, parse_jsonl
from datamodules.examples import Example

SAMPLES = "samples.jsonl"
KEY = ("set", "id", "subset", "shot", "prompt")


def sample_key(set_name: str, rid: str, subset: str, shot: int, prompt: str) -> tuple:
    return (set_name, str(rid), subset, int(shot), prompt)


def example_key(ex: Example) -> tuple:
    return sample_key(ex.extra["set"], ex.id, ex.subset, ex.shot, ex.instruction)


def record_key(row: dict) -> tuple:
    return sample_key(*(row[k] for k in KEY))


def read_samples(path: Path, repair: bool = True) -> list[dict]:
    """The generations written so far; with `repair`, a line cut by an interruption is dropped
    from the file (the run that resumes regenerates it)."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(len(data))
    return parse_jsonl(path, decode(path, data))


def append_samples(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())  # the point of the file: what was generated survives a crash


def write_samples(path: Path, rows: list[dict]) -> None:
    """All rows, atomically: a reader never sees a half-written file (a full disk: one line)."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), what="samples")
