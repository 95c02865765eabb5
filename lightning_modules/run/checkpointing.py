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
import ctypes
import errno
import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from core.errors import UserError
from core.files import atomic_stream, atomic_write, fsync_dir, io_error
from lightning_modules.run.identity import IDENTITY_FILE


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
        bad = non_finite_in(checkpoint)
        if bad:
            self.discard()
            raise weights_diverged(checkpoint, path, bad)
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
            remove_path(pending)
        if Path(path).exists():
            super().remove_checkpoint(path)

    def publish(self) -> None:
        """The pending checkpoints become the real ones (their weights just gave a finite loss)."""
        for path, pending in list(self.pending.items()):
            try:
                replace_path(pending, path)
            except OSError as err:
                raise UserError(f"{io_error('checkpoint', path, err)}; the last complete checkpoint is kept") from err
            del self.pending[path]
            fsync_dir(path.parent)

    def discard(self) -> list[int]:
        """Drop the pending checkpoints (their weights gave a non-finite loss); their steps."""
        steps = []
        for path, pending in list(self.pending.items()):
            steps.append(saved_step(pending))
            remove_path(pending)
            del self.pending[path]
        return steps


def pending_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.pending")


def non_finite_in(checkpoint: dict) -> str:
    return non_finite_tensor(checkpoint.get("state_dict", {})) or non_finite_tensor(
        checkpoint.get("optimizer_states", []), "optimizer_states")


def weights_diverged(checkpoint: dict, path, bad: str):
    from lightning_modules.methods.alignment import TrainingDiverged

    kept = (f"{path} (step {saved_step(Path(path))}); resume from it with resume=last"
            if Path(path).exists() else "none")
    error = TrainingDiverged(f"non-finite weights after step {checkpoint.get('global_step')} ({bad}): "
                             f"checkpoint not written; the last one with finite weights is {kept}")
    error.names_checkpoint = True
    return error


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
    """The name of the first floating-point tensor in `tree` holding NaN or Inf ("" if none); of a
    sharded tensor (DTensor), this rank's shard."""
    if isinstance(tree, torch.Tensor):
        tree = tree.to_local() if hasattr(tree, "to_local") else tree
        return prefix if tree.is_floating_point() and not torch.isfinite(tree).all() else ""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return ""


def saved_step(path: Path):
    """The global step of a checkpoint file (memory-mapped: nothing but the header is read), or of a
    sharded checkpoint directory (its run_identity.json, else the meta.pt Lightning writes into it)."""
    try:
        if Path(path).is_dir():
            if (Path(path) / IDENTITY_FILE).is_file():
                return json.loads((Path(path) / IDENTITY_FILE).read_text())["global_step"]
            path = Path(path) / "meta.pt"
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


# -- sharded checkpoints: a directory written whole beside the old one, then swapped in ---------------
RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically


def exchange_paths(a: Path, b: Path) -> None:
    """Swap `a` and `b` in one atomic step (Linux renameat2); OSError where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_cwd = -100  # AT_FDCWD
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def aside_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def replace_path(new: Path, path: Path) -> None:
    """`new` becomes `path`: a file by `os.replace`; a directory by an atomic exchange with the old one,
    which is then removed. Where the filesystem cannot exchange, the old directory is first renamed
    aside (`.<name>.old`) and `recover_checkpoint_dir` restores it if a kill falls between the renames."""
    if not new.is_dir() or not path.exists():
        os.replace(new, path)
    else:
        try:
            exchange_paths(new, path)
        except OSError:
            os.replace(path, aside_path(path))
            os.replace(new, path)
            new = aside_path(path)
        remove_path(new)
    fsync_dir(path.parent)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_checkpoint_dir(path: Path) -> None:
    """After a kill between the two renames of `replace_path`'s fallback: the old checkpoint back."""
    if not path.exists() and aside_path(path).is_dir():
        os.replace(aside_path(path), path)


def _all_ranks_any(strategy, flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=strategy.root_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def atomic_directory_checkpoint(strategy, checkpoint: dict, path, write, checkpoint_io=None,
                                local_tensors: Optional[dict] = None) -> None:
    """A sharded checkpoint (a directory every rank writes into) through the same guarantees as a file:
    the non-finite-weights guard runs over each rank's shards and all ranks agree before anything is
    written; `write(checkpoint, directory)` writes into a temporary sibling directory, which replaces
    the old checkpoint only once every rank has finished (a kill or a full disk mid-write leaves the
    previous one whole and loadable); with `checkpoint_io.defer` (VerifiedCheckpoints) it waits as
    `.<name>.pending` until the next step's loss is finite. Rank 0 also writes run_identity.json."""
    path = Path(strategy.broadcast(str(path)))
    bad = non_finite_in(checkpoint) or non_finite_tensor(local_tensors or {}, "state_dict")
    if _all_ranks_any(strategy, bool(bad)):
        if checkpoint_io is not None:
            checkpoint_io.discard()
        raise weights_diverged(checkpoint, path, bad or "a tensor shard on another rank")
    deferred = checkpoint_io is not None and checkpoint_io.defer
    target = pending_path(path) if deferred else path.with_name(f".{path.name}.tmp")
    identity = {**checkpoint.get("run_identity", {}), "world_size": int(strategy.world_size),
                "strategy": type(strategy).__name__, "global_step": checkpoint.get("global_step")}
    if strategy.is_global_zero:
        recover_checkpoint_dir(path)
        remove_path(target)  # a stale one, from a run killed mid-write
        path.parent.mkdir(parents=True, exist_ok=True)
    strategy.barrier("checkpoint_dir_ready")
    failed = None
    try:
        write(checkpoint, target)
        if strategy.is_global_zero:
            atomic_write(target / IDENTITY_FILE, json.dumps(identity), what="checkpoint")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 -- a full disk on some rank (DCP's CheckpointException on every rank)
        failed = err
    if _all_ranks_any(strategy, failed is not None):
        if strategy.is_global_zero:
            remove_path(target)
        cause = os_error_in(failed)
        if cause is None and failed is not None and not isinstance(failed, UserError):
            raise failed  # not a storage fault: the run's own error handling names it
        line = io_error("checkpoint", path, cause) if cause is not None else failed if failed is not None else \
            UserError(f"cannot write checkpoint {path}: another rank failed to write its shards")
        raise UserError(f"{line}; the last complete checkpoint is kept") from failed
    if strategy.is_global_zero:
        for file in target.rglob("*"):  # durable before it is published
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if deferred:
            checkpoint_io.pending[path] = target
        else:
            try:
                replace_path(target, path)
            except OSError as err:
                raise UserError(f"{io_error('checkpoint', path, err)}; the last complete checkpoint is kept") from err
    strategy.barrier("checkpoint_dir_published")


def os_error_in(err: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind `err`: itself, its causes, or a rank's failure inside DCP's CheckpointException."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        for failure in (getattr(err, "failures", None) or {}).values():  # rank -> (exception, traceback)
            failure = failure[0] if isinstance(failure, tuple) else failure
            found = os_error_in(failure if isinstance(failure, BaseException) else None)
            if found is not None:
                return found
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


class AtomicDirectoryCheckpoints:
    """Mixin for a Lightning strategy that writes checkpoints as directories (ModelParallelStrategy
    with save_distributed_checkpoint=True, DeepSpeedStrategy): its `save_checkpoint` goes through
    `atomic_directory_checkpoint`. Put it first: `class S(AtomicDirectoryCheckpoints, ModelParallelStrategy)`."""

    def writes_directory(self) -> bool:
        return bool(getattr(self, "_save_distributed_checkpoint", True))

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        if not self.writes_directory():  # one file on rank 0, through the CheckpointIO (AtomicCheckpointIO)
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        io = self.checkpoint_io if isinstance(self.checkpoint_io, AtomicCheckpointIO) else None
        atomic_directory_checkpoint(self, checkpoint, filepath, lambda ckpt, target: super(
            AtomicDirectoryCheckpoints, self).save_checkpoint(ckpt, target, storage_options), io,
            self.local_tensors())

    def local_tensors(self) -> dict:
        """Tensors this rank holds that the checkpoint dict does not (checked for NaN/Inf too)."""
        return {}


class AtomicModelParallelStrategy(AtomicDirectoryCheckpoints, ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) whose sharded checkpoints are atomic and guarded."""


class AtomicDeepSpeedStrategy(AtomicDirectoryCheckpoints, DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy whose checkpoint directories are atomic and guarded; the
    non-finite guard also reads each rank's ZeRO partitions (`ds_tensor`), which the Lightning
    checkpoint dict does not hold.

    Also runs on CPU processes (`trainer.accelerator=cpu`, gloo): DeepSpeed's own CPU accelerator
    (chosen when torch sees no GPU) runs the same engine and ZeRO-2/3 code as on GPUs; Lightning's
    wrapper assumes CUDA in three places, overridden below for CPU only (setup_environment,
    root_device, setup_distributed). Checkpoint files load as data (load_checkpoint), and
    `trainer.test` after fit keeps transformers' hooks (_initialize_deepspeed_inference), on any device."""

    def _on_cpu(self) -> bool:
        from lightning.pytorch.accelerators import CPUAccelerator

        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skips Lightning's "only supported on CUDA GPUs" check

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # deepspeed.initialize takes root_device.index as this process's device rank (None for "cpu")
        return torch.device("cpu", self.local_rank) if device.type == "cpu" else device

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        # Lightning's version first checks the device indices (_validate_device_index_selection), None on CPU
        reset_seed()
        self.set_world_ranks()
        from deepspeed.accelerator import get_accelerator, set_accelerator

        if get_accelerator().device_name() != "cpu":  # a GPU machine told to train on CPU processes
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            set_accelerator(CPU_Accelerator())
        # DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce op here (a C++ compiler,
        # ~1 min the first time); only its tensor-parallel inference uses it, ZeRO trains over gloo.
        ds_comm = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch is also torch itself)
        build_shm_op, ds_comm.build_shm_op = ds_comm.build_shm_op, lambda: None
        try:
            self._init_deepspeed_distributed()
        finally:
            ds_comm.build_shm_op = build_shm_op

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        """DeepSpeed's engine reads the checkpoint's .pt files through its checkpoint engine, whose
        TorchCheckpointEngine unpickles them with weights_only=False: here it loads them as data
        (core.checkpoints.load_deepspeed_file), so no code runs from a checkpoint even past the check
        resume makes first (core.checkpoints.check_sharded_checkpoint)."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        from core.checkpoints import load_deepspeed_file

        engine = getattr(self.deepspeed_engine, "checkpoint_engine", None)
        if isinstance(engine, TorchCheckpointEngine):
            engine.load = lambda path, map_location=None: load_deepspeed_file(path, map_location, checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only)

    def _initialize_deepspeed_inference(self, model) -> None:
        super()._initialize_deepspeed_inference(model)
        # Lightning's version (trainer.test after fit) clears every module hook first, transformers'
        # output-capture hooks too (installed once, at the first forward that asks for hidden states):
        # LLaVA's vision tower then returns no hidden states. Cleared flags make them install again.
        for module in model.modules():
            if getattr(module, "_output_capturing_hooks_installed", False):
                module._output_capturing_hooks_installed = False

    def local_tensors(self) -> dict:
        module = self.lightning_module
        return {n: getattr(p, "ds_tensor", p) for n, p in module.named_parameters()} if module is not None else {}
