"""Reading a Lightning checkpoint written by `fit`, safely: the archive checked whole (zip CRCs),
then loaded with weights_only=True (a checkpoint is data, never code). Used to resume a run and
to evaluate a checkpoint.

Trainable-only checkpoints (LoRA, RMU: runs whose frozen tensors outnumber the trained ones) leave
the frozen base out and name it instead (`run_identity`: name_or_path, revision, and `base_digest`,
a SHA-256 over the frozen tensors' names, dtypes, shapes and bytes, hashed once per process at about
1.5 GB/s: ~10 s for a 7B base). Whoever loads one rebuilds the base from its config, hashes the
tensors the checkpoint leaves out, and refuses a different base (`check_base`).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

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


def tensors_digest(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 over the tensors `keys` of `state` (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(state[key].shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def base_label(identity: Mapping) -> str:
    """A base as a message names it: name_or_path@revision (weights sha256 prefix)."""
    digest = identity.get("base_digest")
    revision = identity.get("revision")
    return f"{identity.get('name_or_path')}{f'@{revision}' if revision else ''}" + \
        (f" (weights {digest[:12]})" if digest else "")


def check_base(saved: Mapping, current: Mapping, path, label: str = "resume checkpoint") -> None:
    """A trainable-only checkpoint goes only onto the frozen base it was trained on."""
    if saved.get("base_digest") != current.get("base_digest"):
        raise UserError(f"{label} {path} holds only the trained tensors of base {base_label(saved)}, but this run's "
                        f"base is {base_label(current)}: load the checkpoint's base (model.name_or_path, model.revision; "
                        "a model built from config: its model.tiny settings and seed)")
