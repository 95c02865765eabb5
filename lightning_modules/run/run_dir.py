"""The run directory: chosen (a finished run is never overwritten: a new `_N` suffix), locked by
one process, shared with the DDP ranks Lightning starts, and the archive of a finished run
that is trained further."""

from __future__ import annotations

import os
import socket
from pathlib import Path


from core.distributed import is_launch_rank_zero
from core.errors import UserError
from core.files import DirectoryLock, in_use_error


RUN_DIR_ENV = "SAFETY_MIRAGE_RUN_DIR"  # DDP re-runs this script per rank: all ranks share rank 0's dir
_RUN_LOCKS: dict[str, DirectoryLock] = {}  # run dirs this process owns


def is_finished(run_dir: Path) -> bool:
    """A run that wrote its results (or, with eval.test_at_end=false, its model)."""
    return (run_dir / "results.csv").exists() or (run_dir / "model").exists()


def fresh_run_dir(path: Path) -> Path:
    """`path`, or `path_N` (the first N free) when a finished run is already there."""
    n, candidate = 1, path
    while is_finished(candidate):
        candidate, n = path.with_name(f"{path.name}_{n}"), n + 1
    return candidate


def prepare_run_dir(cfg) -> Path:
    """The run directory, writable and locked by this process; a finished run's results are never
    overwritten (a new `_N` suffix is taken unless resuming; `resume=auto` never resumes a
    finished run). A second run on a locked directory fails at once."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])  # a DDP rank Lightning started: rank 0 holds the lock
    run_dir = Path(cfg.run_dir)
    if not cfg.resume or cfg.resume == "auto":
        run_dir = fresh_run_dir(run_dir)
    if not is_launch_rank_zero():
        # torchrun / SLURM start every rank themselves: the directory is rank 0's to create and lock.
        os.environ[RUN_DIR_ENV] = str(run_dir)
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # One probe per process: under torchrun / SLURM every rank runs this at the same time.
        probe = run_dir / f".write_test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        lock = DirectoryLock(run_dir)
        locked = lock.acquire()
    except OSError as err:
        raise UserError(f"run_dir '{run_dir}' is not writable: {err.strerror}") from err
    if not locked:
        raise in_use_error(run_dir, lock)
    _RUN_LOCKS[str(run_dir)] = lock
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def release_run_dir(run_dir: Path | None = None) -> None:
    """Unlock `run_dir` (every run dir this process holds when None)."""
    for key in [str(run_dir)] if run_dir is not None else list(_RUN_LOCKS):
        lock = _RUN_LOCKS.pop(key, None)
        if lock is not None:
            lock.release()


def archive_finished_run(run_dir: Path, step) -> Path:
    """A finished run trained further: its results, model and config move to
    `finished-step<N>/` before the new ones are written (nothing of it is overwritten)."""
    archive = run_dir / f"finished-step{step}"
    archive.mkdir(exist_ok=True)
    for name in ("results.csv", "results.json", "samples.jsonl", "model", "config.yaml"):
        if (run_dir / name).exists():
            os.replace(run_dir / name, archive / name)
    return archive
