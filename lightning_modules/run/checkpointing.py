"""What makes a killed run resumable exactly: atomic checkpoint files and per-batch seeding.

Atomic writes. Lightning's TorchCheckpointIO already writes through an fsspec transaction, but
fsspec's local temp file comes from `tempfile.mkstemp()`, i.e. the system temp dir: when that is
another filesystem than the run dir (local /tmp vs. NFS/Lustre on most clusters) `shutil.move`
degrades to copy + delete, and a crash mid-copy leaves a truncated `last.ckpt`. Here the temp
file sits next to the target, is fsynced, then `os.replace`d over it: on a POSIX filesystem a
reader sees the old checkpoint or the new one, never a partial one.

Per-batch seeding. Dropout (e.g. LoRA dropout) draws from the global RNG, which other things
consume too (each DataLoader iterator draws a base seed, validation runs or not around a
resume). Reseeding at every training batch from (seed, epoch, batch, rank) makes the random
stream of a step a function of its position, so a resumed run draws what the uninterrupted one
drew, without saving RNG states (the fairseq approach).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from core.errors import UserError
from core.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are temp-file-in-the-same-dir + fsync + rename, and
    which never writes a checkpoint holding a non-finite tensor (the divergence guard: the last
    checkpoint on disk is always one a run can resume from)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        bad = non_finite_tensor(checkpoint.get("state_dict", {})) or non_finite_tensor(
            checkpoint.get("optimizer_states", []), "optimizer_states")
        if bad:
            from lightning_modules.methods.alignment import TrainingDiverged

            kept = (f"{path} (step {saved_step(Path(path))}); resume from it with resume=last"
                    if Path(path).is_file() else "none")
            error = TrainingDiverged(f"non-finite weights after step {checkpoint.get('global_step')} ({bad}): "
                                     f"checkpoint not written; the last one with finite weights is {kept}")
            error.names_checkpoint = True
            raise error
        if "://" in str(path):  # remote storage: keep fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a pickling error never touches the disk
        try:
            atomic_write(path, buffer.getvalue(), what="checkpoint")
        except UserError as err:  # disk full, quota, read-only: the previous checkpoint is untouched
            raise UserError(f"{err}; the last complete checkpoint is kept") from err


def non_finite_tensor(tree, prefix: str = "") -> str:
    """The name of the first floating-point tensor in `tree` holding NaN or Inf ("" if none)."""
    if isinstance(tree, torch.Tensor):
        return prefix if tree.is_floating_point() and not torch.isfinite(tree).all() else ""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return ""


def saved_step(path: Path):
    """The global step of a checkpoint file (memory-mapped: nothing but the header is read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # noqa: BLE001 -- only used to word a message
        return "?"


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    key = f"{seed}/{epoch}/{batch_idx}/{rank}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


class PerBatchSeed(L.Callback):
    """Seeds torch (all devices) at each training batch from (seed, epoch, batch index, rank)."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        torch.manual_seed(batch_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))
