"""Reading a Lightning checkpoint written by `fit`, safely: the archive checked whole (zip CRCs),
then loaded with weights_only=True (a checkpoint is data, never code). Used to resume a run and
to evaluate a checkpoint."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from core.errors import UserError


def read_checkpoint(path: Path, label: str = "resume checkpoint") -> dict:
    """Every member of a checkpoint file checked (zip CRCs) and its header loaded (weights_only,
    memory-mapped): a corrupt checkpoint is refused before anything is written."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(f"{label} {path} is not a PyTorch checkpoint (truncated or another file)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"{label} {path} is corrupt: {err}") from err
    if bad is not None:
        raise UserError(f"{label} {path} is corrupt: member '{bad}' fails its CRC check")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"cannot load {label} {path} with weights_only=True: "
                        f"{str(err).strip().splitlines()[0]}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{label} {path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt
