"""Files shared between processes, written so a reader never sees half of one.

- `atomic_write(path, data)`: temp file next to the target + fsync + `os.replace`; a reader sees
  the old file or the new one. An OSError (disk full, read-only) becomes one `UserError` naming
  what was being written, and the old file is left as it was.
- `file_lock(path)`: an exclusive `fcntl.flock` on a lock file. The OS drops it when the process
  dies, so a crashed holder never leaves a stale lock (the file itself may stay; it is empty).
- `build_once(final, build)`: a cache entry built in a temporary sibling directory and published
  with one `os.rename`; concurrent builders of the same key wait on a lock and reuse the first
  one's result.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from core.errors import UserError


def io_error(what: str, path, err: OSError) -> UserError:
    """The one-line message of a failed write."""
    reason = err.strerror or str(err)
    hint = " (disk full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return UserError(f"cannot write {what} {path}: {reason}{hint}")


def fsync_dir(directory: Path) -> None:
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


def atomic_write(path: str | Path, data: str | bytes, what: str = "file") -> None:
    """Write `data` to `path` atomically; an OSError leaves the previous file intact."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise io_error(what, path, err) from err
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if needed). Yields False, without the lock, when
    `blocking` is False and another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class DirectoryLock:
    """A lock held for as long as a run owns a directory (released by `release()` or at exit)."""

    NAME = ".lock"

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the message of the next one
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def in_use_error(directory, lock: DirectoryLock) -> UserError:
    return UserError(f"run_dir '{directory}' is in use by another run (pid {lock.holder()}); wait for it to end "
                     "or choose another run_dir")


@contextlib.contextmanager
def hold_directory(directory: str | Path) -> Iterator[None]:
    """Own an existing directory for the duration of the block; one line if another run owns it."""
    lock = DirectoryLock(directory)
    if not lock.acquire():
        raise in_use_error(directory, lock)
    try:
        yield
    finally:
        lock.release()


def build_once(final: str | Path, build: Callable[[Path], None], done: str) -> Path:
    """Return `final`, building it first if `final/done` does not exist: `build(tmp)` fills a
    temporary sibling, which is renamed into place. Builders of the same `final` take turns on a
    lock file; the second finds the first one's result and returns it."""
    final = Path(final)
    if (final / done).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.with_name(f".{final.name}.lock")
    with file_lock(lock):
        if (final / done).exists():  # built while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            if final.exists():  # debris without its `done` marker (not a concurrent build: we hold the lock)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as err:
            raise io_error("cache", final, err) from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Published: whoever takes the lock after this finds `final` (waiters too, on the old file).
        lock.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return final
