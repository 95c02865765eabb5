"""The ranks that Lightning's launcher starts watch the rank 0 that started them. Rank 0 killed from
outside (SIGKILL, the kernel's OOM killer) leaves them orphaned, and an orphan may wait on it for
the whole collective timeout (30 minutes by default) or longer: in the start-up rendezvous it
retries its connection to rank 0's store until then, and between generation jobs it waits on a
group with a 7-day timeout. From the start of the command (`core.errors.cli_main`) an orphan sees
its parent change within 0.2 s, gives its own exit 2 s, then leaves in one line: local rank 1
names the cause (`error: rank 0: gone ...`), the others say why they stop. (Rank 0 itself, seeing
a rank die, ends the others before it leaves: run/ranks.ChildWatcher; none is orphaned then.)

Rank 0 names itself to the ranks it starts in `SAFETY_MIRAGE_LAUNCHER` (its pid, set only while it
launches them, `launching`): a rank that another launcher started (torchrun, Slurm) has no such
parent to watch."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Optional

LAUNCHER_ENV = "SAFETY_MIRAGE_LAUNCHER"
POLL_S, GRACE_S = 0.2, 2.0


def _local_rank() -> str:
    return os.environ.get("LOCAL_RANK", "0") or "0"


@contextlib.contextmanager
def launching():
    """Rank 0, while Lightning's launcher starts the other ranks: they learn its pid."""
    if _local_rank() != "0":
        yield
        return
    before = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = before


class ParentWatch(threading.Thread):
    def __init__(self, parent: int):
        super().__init__(daemon=True, name="parent-watch")
        self.parent = parent
        self.kept = "what was written is kept: the same command resumes"  # the command says what exactly
        self._done = threading.Event()

    def run(self) -> None:
        while os.getppid() == self.parent:  # re-parented once it is gone (also if it went before we looked)
            if self._done.wait(POLL_S):
                return
        if self._done.wait(GRACE_S):  # this rank was leaving by itself: nothing to say
            return
        local, node = _local_rank(), os.environ.get("NODE_RANK", "0") or "0"
        lead = "rank 0" if node == "0" else f"node {node}'s first rank"
        if local == "1":  # one line names the cause; the other orphans say why they stop
            print(f"error: {lead}: gone (pid {self.parent} ended without a word: killed by a signal? SIGKILL, "
                  f"or the kernel's OOM killer); the other ranks stop; {self.kept}", file=sys.stderr, flush=True)
        else:
            me = f"rank {local}" if node == "0" else f"local rank {local} of node {node}"
            print(f"{me} stopped: {lead} (pid {self.parent}) is gone", file=sys.stderr, flush=True)
        os._exit(1)  # noqa: SLF001 -- the main thread may be stuck in a collective for good

    def stop(self) -> None:
        self._done.set()


_WATCH: Optional[ParentWatch] = None


def watch_parent() -> None:
    """Start watching, on a rank that Lightning's launcher started (a no-op elsewhere)."""
    global _WATCH
    parent = os.environ.get(LAUNCHER_ENV, "")
    if _WATCH is not None or _local_rank() == "0" or not parent.isdigit():
        return
    _WATCH = ParentWatch(int(parent))
    _WATCH.start()


def orphan_note(kept: str) -> None:
    """What an orphaned rank's line says a stopped run leaves behind, and how to go on."""
    if _WATCH is not None:
        _WATCH.kept = kept


def stop_watching() -> None:
    """The command is done: a rank 0 that leaves now has ended it."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop()
        _WATCH = None
