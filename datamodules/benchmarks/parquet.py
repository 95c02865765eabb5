"""Parquet releases (Hugging Face `datasets` exports such as lmms-lab's and SPA-VL's), streamed.

Only the text columns are read, a batch at a time; each row's image stays in the file and is named
by a parquet image reference (`core.parquet_images`) that the collator decodes when it needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

from core.errors import UserError
from core.parquet_images import parquet_image_ref


def parquet_files(path: str | Path, split: Optional[str] = None) -> list[Path]:
    """The parquet files at `path`: the file itself, or those under the folder (recursively, in
    name order), limited to names containing `split` when one is given."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"benchmark data not found: {path}")
    if path.is_file():
        if path.suffix != ".parquet":
            raise UserError(f"{path}: not a .parquet file")
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if split:
        files = [f for f in files if split in f.relative_to(path).as_posix()]
    if not files:
        raise UserError(f"{path}: no .parquet files{f' with {split!r} in their path' if split else ''}")
    return files


def _schema_names(file: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file).schema_arrow.names
    except Exception as err:  # ArrowInvalid / OSError: not parquet, truncated
        raise UserError(f"{file}: not a readable parquet file ({str(err).splitlines()[0][:200]})") from err


def iter_rows(files: Sequence[Path], required: Sequence[str], optional: Sequence[str] = (),
              image_column: Optional[str] = "image", what: str = "release") -> Iterator[tuple[str, int, dict, Optional[str]]]:
    """(where, row, record, image reference) for every row: `where` names the file and row for
    errors; the record holds the `required` and present `optional` columns."""
    import pyarrow.parquet as pq

    for file in files:
        names = _schema_names(file)
        missing = [c for c in list(required) + ([image_column] if image_column else []) if c not in names]
        if missing:
            raise UserError(f"{file}: no column {missing[0]!r}; is this a {what} file? (columns: {', '.join(names)})")
        columns = list(required) + [c for c in optional if c in names]
        row = 0
        for batch in pq.ParquetFile(file).iter_batches(columns=columns, batch_size=1024):
            for record in batch.to_pylist():
                image = parquet_image_ref(file, image_column, row) if image_column else None
                yield f"{file}: row {row}", row, record, image
                row += 1
