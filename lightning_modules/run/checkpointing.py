"""What makes a killed run resumable exactly: atomic checkpoint files and per-batch seeding.

Atomic writes. Lightning's TorchCheckpointIO already writes through an fsspec transaction, but
fsspec's local temp file comes from `tempfile.mkstemp()`, i.e. the system temp dir: when that is
another filesystem than the run dir (local /tmp vs. NFS/Lustre on most clusters) `shutil.move`
degrades to copy + delete, and a crash mid-copy leaves a truncated `last.ckpt`. Here the temp
file sits next to the target, is fsynced, then `os.replace`d over it: on a POSIX filesystem a
reader sees the old checkpoint or the new one, never a partial one. `torch.save` streams into that
file: no second copy of the state in memory.

Per-batch seeding. Dropout (e.g. LoRA dropout) draws from the global RNG, which other things
consume too (each DataLoader iterator draws a base seed, validation runs or not around a
resume). Reseeding at every training batch from (seed, epoch, batch, rank) makes the random
stream of a step a function of its position, so a resumed run draws what the uninterrupted one
drew, without saving RNG states (the fairseq approach).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from core.errors import UserError
from core.files import atomic_stream, fsync_dir, io_error


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are temp-file-in-the-same-dir + fsync + rename, and
    which never writes a checkpoint holding a non-finite tensor (the divergence guard: the last
    checkpoint on disk is always one a run can resume from).

    With `defer` (set by `VerifiedCheckpoints` while training), a checkpoint is written whole to
    `.<name>.pending` and only renamed over `<name>` once the next training step's loss is finite:
    weights that are finite but already destroyed (a learning rate of 1e30 gives finite, enormous
    weights one step before the loss overflows) never replace the last checkpoint that trains."""

    def __init__(self):
        super().__init__()
        self.defer = False
        self.pending: dict[Path, Path] = {}  # target -> its written, not yet verified, pending file

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        bad = non_finite_tensor(checkpoint.get("state_dict", {})) or non_finite_tensor(
            checkpoint.get("optimizer_states", []), "optimizer_states")
        if bad:
            from lightning_modules.methods.alignment import TrainingDiverged

            self.discard()
            kept = (f"{path} (step {saved_step(Path(path))}); resume from it with resume=last"
                    if Path(path).is_file() else "none")
            error = TrainingDiverged(f"non-finite weights after step {checkpoint.get('global_step')} ({bad}): "
                                     f"checkpoint not written; the last one with finite weights is {kept}")
            error.names_checkpoint = True
            raise error
        if "://" in str(path):  # remote storage: keep fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        target = pending_path(path) if self.defer else path
        try:  # streamed: the state is never serialised whole in memory (80 GB for a 7B full fine-tune)
            atomic_stream(target, lambda stream: torch.save(checkpoint, stream), what="checkpoint")
        except UserError as err:  # disk full, quota, read-only: the previous checkpoint is untouched
            cause = err.__cause__ if isinstance(err.__cause__, OSError) else None
            line = io_error("checkpoint", path, cause) if cause else err  # named by its target, not the temp file
            raise UserError(f"{line}; the last complete checkpoint is kept") from err
        if self.defer:
            self.pending[path] = target

    def remove_checkpoint(self, path) -> None:
        pending = self.pending.pop(Path(path), None)
        if pending is not None:
            pending.unlink(missing_ok=True)
        if Path(path).exists():
            super().remove_checkpoint(path)

    def publish(self) -> None:
        """The pending checkpoints become the real ones (their weights just gave a finite loss)."""
        for path, pending in list(self.pending.items()):
            try:
                os.replace(pending, path)
            except OSError as err:
                raise UserError(f"{io_error('checkpoint', path, err)}; the last complete checkpoint is kept") from err
            del self.pending[path]
            fsync_dir(path.parent)

    def discard(self) -> list[int]:
        """Drop the pending checkpoints (their weights gave a non-finite loss); their steps."""
        steps = []
        for path, pending in list(self.pending.items()):
            steps.append(saved_step(pending))
            pending.unlink(missing_ok=True)
            del self.pending[path]
        return steps


def pending_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.pending")


class VerifiedCheckpoints(L.Callback):
    """Publishes a checkpoint when the step after it trained with a finite loss (see
    `AtomicCheckpointIO.defer`); after a divergence, drops it. Runs before ModelCheckpoint (Lightning
    puts checkpoint callbacks last), so the checkpoint of step s is published at the end of step s+1,
    before the one of step s+1 is written."""

    def __init__(self, checkpoint_io: AtomicCheckpointIO):
        self.io = checkpoint_io
        self.discarded: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.io.defer = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.io.publish()

    def on_train_end(self, trainer, pl_module) -> None:
        self.io.publish()  # the final weights: nothing after them to verify; they are the result
        self.io.defer = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning_modules.methods.alignment import TrainingDiverged

        if isinstance(exception, TrainingDiverged):
            self.discarded = self.io.discard()
        else:  # interrupted, out of memory, ...: the pending weights trained as far as anyone knows
            with contextlib.suppress(UserError):  # a full disk: the error already on its way says so
                self.io.publish()
        self.io.defer = False


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
