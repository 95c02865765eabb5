"""Files shared between processes, written so a reader never sees half of one.

This module is the one door through which the project writes files (results, samples, caches,
figures, world images, exports, logs it owns); a full disk or a read-only directory ends in one
line naming what was being written, and files written earlier stay whole.

- `atomic_write(path, data)`: temp file next to the target + fsync + `os.replace`; a reader sees
  the old file or the new one. An OSError (disk full, read-only) becomes one `UserError` naming
  what was being written, and the old file is left as it was. `save_image` / `save_figure` render
  to memory first and go through it. `atomic_stream(path, write)`: the same, streamed (a 7B
  checkpoint never held twice in memory).
- `append_lines(path, lines)`: line-atomic appends (one `write` on an `O_APPEND` descriptor; a
  failed write is cut back to the file's previous length). `read_lines(path)` drops a half line
  left by a crash, with a warning.
- `writing(what, path)`: the same one line for a writer we do not own (TensorBoard, `save_pretrained`).
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
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from core.errors import UserError
from core.records import decode


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


STORAGE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # the storage, not the program


def storage_fault(err: BaseException, fallback_path) -> UserError | None:
    """The one line for an OSError that a writer we do not own (TensorBoard's event files, a
    library's cache) raised because the storage refused it; None for any other error."""
    if isinstance(err, OSError) and err.errno in STORAGE_FAULTS:
        return io_error("file", err.filename or fallback_path, err)
    return None


@contextlib.contextmanager
def writing(what: str, path) -> Iterator[None]:
    """Run a writer we do not own (TensorBoard, `save_pretrained`, ...): an OSError inside becomes
    the one line of `io_error`."""
    try:
        yield
    except OSError as err:
        raise io_error(what, path, err) from err


def atomic_write(path: str | Path, data: str | bytes, what: str = "file", durable: bool = True) -> None:
    """Write `data` to `path` atomically; an OSError leaves the previous file intact. `durable=False`
    skips the fsyncs, for files inside a staging directory that is itself published by one rename."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    atomic_stream(path, lambda stream: stream.write(payload), what=what, durable=durable)


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


class _DescriptorWriter(io.RawIOBase):
    """A raw writable stream over a descriptor, through this module's `os` (what the tests' full
    disk replaces)."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return os.write(self.fd, data)


def atomic_stream(path: str | Path, write: Callable[[Any], None], what: str = "file", durable: bool = True) -> None:
    """`write(stream)` streams into a temp file beside `path` (same filesystem: the rename is atomic),
    which is fsynced and renamed over `path`: no copy of the whole payload is held in memory, and an
    OSError (a full disk) or any exception inside `write` leaves the previous file whole and no temp
    file behind. OSErrors come out as one line naming `path`. `durable=False`: as in atomic_write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with io.BufferedWriter(_DescriptorWriter(fd), buffer_size=1 << 22) as stream:
                write(stream)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        raise io_error(what, path, err) from err
    finally:
        with contextlib.suppress(OSError):  # e.g. the parent is a file: the error above is the one to show
            tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def save_image(image, path: str | Path, what: str = "image", durable: bool = False, **options) -> None:
    """A PIL image encoded in memory, then written by `atomic_write`."""
    buffer = io.BytesIO()
    image.save(buffer, **{"format": Path(path).suffix.lstrip(".").upper() or "PNG", **options})
    atomic_write(path, buffer.getvalue(), what=what, durable=durable)


def save_figure(fig, path: str | Path, what: str = "figure", **options) -> None:
    """A matplotlib figure rendered in memory, then written by `atomic_write`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **options)
    atomic_write(path, buffer.getvalue(), what=what)


def append_lines(path: str | Path, lines: Iterable[str], what: str = "file", durable: bool = True) -> None:
    """Append whole lines (each gets its newline): one `write` on an O_APPEND descriptor, so a
    concurrent appender's lines never interleave with these; a failed write (disk full) is cut
    back to the file's previous length, and a half line left by an earlier crash is closed first."""
    path = Path(path)
    payload = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")
    if not payload:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise io_error(what, path, err) from err
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            payload = b"\n" + payload  # the next reader drops the half line; ours starts clean
        try:
            _write_all(fd, payload)
            if durable:
                os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no half line of ours stays behind
            raise io_error(what, path, err) from err
    finally:
        os.close(fd)


def open_log(path: str | Path, what: str = "log"):
    """A log file opened for appending (a process's redirected output), its failure one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as err:
        raise io_error(what, path, err) from err


def read_lines(path: str | Path, what: str = "file", repair: bool = False) -> list[tuple[int, str]]:
    """The complete, non-blank lines of an append-only file as (line number, text). A last line
    without its newline (a crash mid-append) is dropped with a warning; with `repair` it is also
    cut from the file. Lines inside the file that a crash broke (closed by a later append) are the
    reader's to judge."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if data and not data.endswith(b"\n"):
        keep, line = data.rfind(b"\n") + 1, data.count(b"\n") + 1
        warnings.warn(f"{path}: dropped a half-written last line (line {line}, {len(data) - keep} bytes) "
                      "left by an interrupted write", stacklevel=2)
        data = data[:keep]
        if repair:
            with contextlib.suppress(OSError), open(path, "r+b") as fh:
                fh.truncate(keep)
    return [(n, line) for n, line in enumerate(decode(path, data).splitlines(), 1) if line.strip()]


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if needed). Yields False, without the lock, when
    `blocking` is False and another process holds it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise io_error("lock file", path, err) from err
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
    """A lock held for as long as a run owns a directory (released by `release()` or at exit).

    The lock file is removed on release, so a run that refused to start (a bad resume checkpoint)
    leaves the directory as it found it. Removing a lock file is safe with the inode check in
    `acquire`: a process that locked the file just before it was unlinked sees that its inode is no
    longer the one at the path, and tries again on the new file."""

    NAME = ".lock"

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # we locked a file its holder removed on release: lock the one at the path now
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
            with contextlib.suppress(OSError):
                self.path.unlink()  # still holding it: nobody can have locked this inode meanwhile
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
