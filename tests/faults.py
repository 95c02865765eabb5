"""Simulated write faults for the tests: a full disk behind `core.files`, the one door every
writer of the project goes through."""

from __future__ import annotations

import errno
import os


class _OsWith:
    """The os module with some functions replaced (installed as `core.files.os` only)."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def full_disk(monkeypatch, fails_from: int = 1, match: str = "") -> None:
    """`core.files` writes to paths containing `match` fail with ENOSPC from the `fails_from`-th
    file opened for writing on: `os.write` on its descriptor raises, as on a full disk."""
    import core.files as files

    count = {"n": 0}
    doomed: set[int] = set()

    def opening(path, flags, *args):
        fd = os.open(path, flags, *args)
        if flags & (os.O_WRONLY | os.O_RDWR) and match in str(path) and not str(path).endswith(".lock"):
            count["n"] += 1
            if count["n"] >= fails_from:
                doomed.add(fd)
        return fd

    def writing(fd, payload):
        if fd in doomed:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, payload)

    monkeypatch.setattr(files, "os", _OsWith(open=opening, write=writing))
