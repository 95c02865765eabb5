"""The one reader of record files (JSON lists and JSON lines), defensive at every step.

Each fault is one `UserError` naming the file and, where there is one, the record: a path that is
missing or a directory, bytes that are not UTF-8 (a Latin-1 or UTF-16 export), malformed JSON, a
top level that is not a list, an empty split, and fields of the wrong type (`field`).
"""

from __future__ import annotations

import codecs
import io
import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from core.errors import UserError
from core.parquet_images import image_bytes, parse_ref

_MISSING = object()


def read_text(path: str | Path, what: str = "data file") -> str:
    """The file's text, decoded as UTF-8 (a UTF-8 byte-order mark is allowed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from err
    return decode(path, data)


def decode(path: str | Path, data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{path}: the file is UTF-16; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}; a Latin-1 "
                        "export?); save it as UTF-8") from err


def read_json_list(path: str | Path, what: str = "data file") -> list:
    """A non-empty JSON list (a data split)."""
    text = read_text(path, what)
    if not text.strip():
        raise UserError(f"{path}: empty file (no records)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise UserError(f"{path}: empty split (no records)")
    return data


def parse_jsonl(path: str | Path, text: str) -> list[dict]:
    """The objects of JSON-lines `text` read from `path` (blank lines skipped)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {n} is not valid JSON ({err.msg}); fix or delete the file") from err
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {n} is a {type(row).__name__}, not a JSON object")
            rows.append(row)
    return rows


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    return parse_jsonl(path, read_text(path, what))


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number", list: "a list",
               dict: "an object"}


def field(path: str | Path, index: int, rec: dict, key: str, kind: type | tuple[type, ...],
          default: Any = _MISSING) -> Any:
    """`rec[key]`, which must be of `kind` (None stands for the default when one is given); a
    missing or wrongly typed field is one line naming the file, the record and the field."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    where = f"{path}: record {index}" + (f" (id={rec.get('id')!r})" if isinstance(rec, dict) and "id" in rec else "")
    value = rec.get(key, None) if isinstance(rec, dict) else None
    if value is None:
        if default is not _MISSING:
            return default
        raise UserError(f"{where} is missing '{key}'")
    # bool is an int to Python, but never a valid count or id here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise UserError(f"{where}: field '{key}' is {value!r}, not {names}")
    return value


def strict_json(obj: Any, **kwargs) -> str:
    """JSON that every parser accepts: NaN and ±Infinity (not JSON) are written as null; numpy and
    torch scalars as plain numbers."""

    def clean(value):
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes)):
            value = value.item()
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


# -- images -----------------------------------------------------------------------------------------
def _image_error(path, record_id, err: BaseException) -> UserError:
    where = f"{path} (record id={record_id})"
    if isinstance(err, FileNotFoundError):
        return UserError(f"missing image {where}")
    if isinstance(err, IsADirectoryError) or Path(path).is_dir():
        return UserError(f"image {where} is a directory, not an image file")
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return UserError(f"image {where} is too large to decode safely: {str(err).splitlines()[0]}")
    return UserError(f"corrupt image {where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def read_image(path: str | Path, record_id: Any, header_only: bool = False):
    """The image as RGB (or, with `header_only`, its size from the header: milliseconds per
    thousand files). Missing, a directory, corrupt, truncated, or a decompression bomb (PIL's
    pixel limit) is one line naming the file and the record. `path` may also be a parquet image
    reference (`core.parquet_images`), decoded from the bytes stored in the file."""
    try:
        source = io.BytesIO(image_bytes(path, record_id)) if parse_ref(path) else path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # huge is refused, not slow
            with Image.open(source) as img:
                return img.size if header_only else img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # UnidentifiedImageError and truncated data are OSErrors; some plugins raise SyntaxError / ValueError.
        raise _image_error(path, record_id, err) from err
