"""Images kept inside parquet files (Hugging Face releases such as lmms-lab's), named by a string
and decoded only when a batch needs them.

A reference is `<file>.parquet#<column>/<row>`. Reading one loads the row group that holds the row
(only that column) and keeps the last few row groups, so a pass in file order reads each group once.
A cell is what `datasets` writes for an `Image` feature, a struct `{bytes, path}`, or plain bytes.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Optional

from core.errors import UserError

_REF = re.compile(r"^(?P<file>.+\.parquet)#(?P<column>[^/#]+)/(?P<row>\d+)$")


def parquet_image_ref(path: str | Path, column: str, row: int) -> str:
    return f"{Path(path).resolve()}#{column}/{row}"


def parse_ref(text: str) -> Optional[tuple[str, str, int]]:
    """(file, column, row) of a reference; None for an ordinary path."""
    m = _REF.match(str(text))
    return (m["file"], m["column"], int(m["row"])) if m else None


def _parquet_file(path: str):
    import pyarrow.parquet as pq  # a dependency; imported here so plain image paths never load it

    try:
        return pq.ParquetFile(path)
    except FileNotFoundError as err:
        raise UserError(f"parquet file not found: {path}") from err
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:200]})") from err


@functools.lru_cache(maxsize=4)
def _row_group(path: str, group: int, column: str) -> list:
    return _parquet_file(path).read_row_group(group, columns=[column]).column(0).to_pylist()


@functools.lru_cache(maxsize=64)
def _footer(path: str) -> tuple[int, tuple[str, ...]]:
    file = _parquet_file(path)
    return file.metadata.num_rows, tuple(file.schema_arrow.names)


def check_ref(ref: str, record_id) -> None:
    """The file, column and row a reference names exist (the footer only: decoding every embedded
    image up front would read the whole release)."""
    path, column, row = parse_ref(ref)
    rows, names = _footer(path)
    if column not in names:
        raise UserError(f"{path}: no column {column!r} (record id={record_id}); columns: {', '.join(names)}")
    if row >= rows:
        raise UserError(f"{path}: no row {row} (record id={record_id}); the file has {rows} rows")


def image_bytes(ref: str, record_id) -> bytes:
    """The encoded image (PNG, JPEG, ...) a reference points at."""
    path, column, row = parse_ref(ref)
    file = _parquet_file(path)
    meta, names = file.metadata, file.schema_arrow.names
    if column not in names:
        raise UserError(f"{path}: no column {column!r} (record id={record_id}); columns: {', '.join(names)}")
    start = 0
    for group in range(meta.num_row_groups):
        size = meta.row_group(group).num_rows
        if row < start + size:
            cell = _row_group(path, group, column)[row - start]
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise UserError(f"{path}: row {row} (record id={record_id}) has no image bytes in column {column!r}")
            return bytes(data)
        start += size
    raise UserError(f"{path}: no row {row} (record id={record_id}); the file has {start} rows")
