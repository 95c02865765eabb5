"""The processes of a generation command (`evaluate`, the suite, the harvest): `trainer.devices=N`
starts N of them with Lightning's own launcher (`lightning.fabric.Fabric(strategy=DDPStrategy).launch()`:
the other ranks re-run the command line, as fit's DDP ranks do; one rank per GPU, or gloo CPU
processes with `trainer.accelerator=cpu`). Generation needs no gradient sync, so the model is never
wrapped: each rank holds a whole copy on its device and answers a disjoint shard.

A fault on a rank ends the run in one line naming the rank: an error is the rank's own line
(`core.errors.RankFailed`); a rank killed by a signal (SIGKILL, the kernel's OOM killer) is named by
rank 0, which watches the processes it started (in place of Lightning's observer, which would kill
rank 0 before it could say which rank died); a rank that hangs is left after
`trainer.strategy.timeout` seconds. The others stop instead of waiting, and what was written stays.
Where no parent watches (torchrun, srun, the ranks rank 0 leaves behind when it dies), every rank's
heartbeat (run/heartbeat.py, `trainer.strategy.heartbeat` seconds) names a rank that vanished.
fit uses the same watcher and `rank_faults` (run/training.py, through the `WatchRanks` callback).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import Callback

from core.distributed import RankPool, set_rank_pool
from core.errors import RankFailed, UserError, is_peer_failure
from core.files import storage_fault
from core.parent_watch import launching, orphan_note
from lightning_modules.analysis.devices import generation_fabric, set_current_fabric
from lightning_modules.config.trainer import heartbeat_grace
from lightning_modules.run.heartbeat import Heartbeat, start_heartbeat

def on_ranks(cfg, command: Callable[[], Any], lead: bool = True) -> Any:
    """`command()` on the processes `cfg.trainer` asks for; its result on rank 0 (None elsewhere).

    lead=True (evaluate, the suite): rank 0 runs the command, the other ranks serve its generation
    jobs (`core.distributed.RankPool`). lead=False (the harvest, which runs fit's run assembly):
    every rank runs the command and generates its shard where the code shards (`rank_and_world`)."""
    fabric = generation_fabric(cfg)
    if fabric.world_size == 1:
        fabric.launch()
        set_current_fabric(fabric)
        try:
            return command()
        finally:
            set_current_fabric(None)
    watcher = ChildWatcher([], heartbeat_s=heartbeat_grace((cfg.get("trainer") or {}).get("strategy")))
    adopt_at_launch(fabric.strategy.launcher, watcher)
    orphan_note(GENERATION_KEPT)  # what an orphaned rank says (rank 0 killed): core/parent_watch.py
    with launching():  # the ranks it starts learn rank 0's pid
        fabric.launch()
    set_current_fabric(fabric)
    timeout = fabric.strategy._timeout  # noqa: SLF001 -- the one we passed
    watcher.beat()
    done = False
    try:
        with rank_faults(fabric.global_rank, watcher):
            if not lead:
                result = command()
            else:
                pool = RankPool(timeout)
                set_rank_pool(pool)
                try:
                    result = command() if fabric.global_rank == 0 else pool.serve()
                finally:
                    # the others return from serve; after a failure inside a job they see rank 0 leave
                    if fabric.global_rank == 0 and not watcher.failed:
                        with contextlib.suppress(Exception):
                            pool.stop()
            done = True
            return result
    finally:
        set_rank_pool(None)
        set_current_fabric(None)
        watcher.stop(kill=not done)
        if done:  # a clean exit: torch tears the groups down before the interpreter does
            torch.distributed.destroy_process_group()


GENERATION_KEPT = "the answers already written are kept: run the same command to resume"
GENERATION_OOM_HINT = ("lower data.eval_batch_size (or evaluate.judge.batch_size); the answers written are kept: "
                       "the same command resumes")


@contextlib.contextmanager
def rank_faults(rank: int, watcher: "ChildWatcher", oom_hint: str = GENERATION_OOM_HINT):
    """An unexpected error on this rank leaves as RankFailed (one line naming it); a rank the watcher
    saw killed was named by it already, and this one leaves quietly. `oom_hint`: what to change
    after an out-of-memory error (fit and generation differ)."""
    try:
        yield
    except UserError:
        raise
    except (Exception, KeyboardInterrupt) as err:
        if isinstance(err, KeyboardInterrupt) or is_peer_failure(err):
            watcher.check(wait_s=10)  # a rank gone: which, and why
        if watcher.failed:
            raise SystemExit(1) from err  # the watcher's line names the rank and the cause
        if isinstance(err, KeyboardInterrupt) or storage_fault(err, "") is not None or is_peer_failure(err):
            raise
        if isinstance(err, torch.OutOfMemoryError):  # what to change, and that nothing is lost
            first = (str(err).strip().splitlines() or [""])[0]
            err = torch.OutOfMemoryError(f"{first}; {oom_hint}")
        raise RankFailed(rank, err) from err


class ChildWatcher(threading.Thread):
    """Rank 0 of Lightning's launch watches the ranks it started: one killed by a signal is named
    (`error: rank R: killed by SIGKILL ...`), and rank 0 stops at once. Replaces Lightning's observer
    (it kills rank 0 with SIGKILL when a child exits non-zero, before anything can be said). A rank
that exits with an error printed its own line; rank 0 then says why it stops. It also holds this
rank's heartbeat (`beat`, every rank): what no parent sees, and the one line of the process."""

    def __init__(self, procs: list, kept: str = GENERATION_KEPT, heartbeat_s: float | None = None):
        super().__init__(daemon=True, name="rank-watcher")
        self.procs: list = []
        self.kept = kept  # what a killed rank left behind, and how to go on
        self.failed = False
        self.heartbeat_s = heartbeat_s
        self.heartbeat: Heartbeat | None = None
        self._done, self._lock = threading.Event(), threading.Lock()
        self.adopt(procs)

    def adopt(self, procs: list) -> None:
        """Watch `procs` (the launcher's list: cleared, so that Lightning's observer, finding every
        child done, stops)."""
        if not procs or self.procs:
            return
        self.procs = list(procs)
        procs.clear()
        self.start()

    def beat(self) -> None:
        """Start this rank's heartbeat (once the process group exists; once)."""
        if self.heartbeat is None and self.heartbeat_s:
            self.heartbeat = start_heartbeat(self.heartbeat_s, self.kept, quiet=lambda: self.failed)

    def _say(self, line: str, error: bool) -> None:
        if self.heartbeat is not None:  # one line per process; an error offered to the other ranks
            self.heartbeat.say(line, error)
        else:
            print(line, file=sys.stderr, flush=True)

    def run(self) -> None:
        while not self._done.wait(0.2):
            if self.check():
                # Rank 0 gets a moment to leave by itself (in a collective it does at once); busy
                # generating, it is stopped here: its rank file loses at most a half line.
                time.sleep(3)
                for proc in self.procs:  # the others leave with it: an orphan could wait on rank 0 for good
                    with contextlib.suppress(Exception):
                        proc.kill()
                os._exit(1)  # noqa: SLF001

    def check(self, wait_s: float = 0) -> bool:
        """Whether a rank has left, said in one line (once, by whichever thread sees it first);
        `wait_s`: how long to wait for the exit status of a rank that a collective says is gone."""
        deadline = time.monotonic() + wait_s
        if wait_s and self.heartbeat is not None:
            self.heartbeat.suspect()  # a collective failed: which rank vanished?
        while True:
            with self._lock:
                if self.failed:
                    return True
                if self.heartbeat is not None and self.heartbeat.said is not None:
                    self.failed = True  # the heartbeat said this process's line
                    return True
                for rank, proc in enumerate(self.procs, 1):
                    code = proc.poll()
                    if code is None or code == 0:
                        continue
                    if code < 0:
                        name = signal.Signals(-code).name
                        self._say(f"error: rank {rank}: killed by {name}" + (
                            " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else "")
                            + f"; {self.kept}", error=True)
                    else:  # the rank printed its own line
                        self._say(f"rank 0 stopped: rank {rank} exited with status {code}", error=False)
                    self.failed = True
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def stop(self, kill: bool) -> None:
        self._done.set()
        if self.heartbeat is not None:
            self.heartbeat.stop(clean=not kill)
        if kill:  # a hung rank must not outlive the run (a rank still printing its line gets a moment)
            for proc in self.procs:
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
                if proc.poll() is None:
                    proc.kill()


def adopt_at_launch(launcher, watcher: ChildWatcher) -> None:
    """`watcher` adopts the ranks Lightning's launcher starts as soon as they are started, before the
    start-up rendezvous: a rank that dies in it is named too, where Lightning's observer (given the
    list next) would SIGKILL rank 0 with it and say nothing. Lightning has no hook there, so the
    launcher's own spawning method is wrapped (the other ranks start none: nothing changes there)."""
    spawn = getattr(launcher, "_call_children_scripts", None)
    if spawn is None:
        return

    def spawning() -> None:
        spawn()
        watcher.adopt(launcher.procs)

    launcher._call_children_scripts = spawning  # noqa: SLF001


class WatchRanks(Callback):
    """Every rank of a fit starts its heartbeat once the process group exists (`setup` runs right
    after the launch, on every rank). Rank 0's watcher adopted the ranks at their start already
    (`adopt_at_launch`)."""

    def __init__(self, watcher: ChildWatcher):
        self.watcher = watcher

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.watcher.beat()
