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
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are temp-file-in-the-same-dir + fsync + rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # remote storage: keep fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a pickling error never touches the disk
        try:
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)  # the rename itself survives a power loss


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


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
