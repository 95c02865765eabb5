"""Every rank of a multi-process run beats once a second over the job's own torch.distributed store
(the TCPStore behind the default process group, whoever started the ranks: Lightning's launcher,
torchrun, srun) and watches the others' beats, so that a rank that vanishes without a word (SIGKILL,
the kernel's OOM killer, a lost node) is named even where no parent watches it.

- A rank whose count stops for `trainer.strategy.heartbeat` seconds (3 s once this rank's own
  collective has failed) is lost: `error: rank R: no heartbeat for N s (killed, or its node lost?);
  <what is kept>`. The first rank to say so claims the line in the store; the others say
  `rank Q stopped: <that line>`, so a process set prints one error line.
- The store unreachable (its host is rank 0, or the torchrun agent): `error: rank 0: the job's store
  at HOST:PORT, which it holds, stopped answering (...)` after that long, at once when this rank's
  collective failed too.
- A rank that leaves marks its count: finished (never blamed; rank 0, which holds the store, waits
  up to two beats for the others to see it) or failed (its own line says why; the others stop 5 s
  later, or at once when the store is gone with it).
The line said, the process leaves at once (`os._exit`): its main thread may be stuck in a collective.
A rank is watched from its first beat; one that dies before it is left to the collective timeout.
Two daemon threads per rank: one talks to the store (a clone of it: a store client is not shared
between threads), one judges, so a store that stops answering mid-request is judged too.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

INTERVAL_S = 1.0
SUSPECT_BEATS = 3  # beats missed once this rank's collective failed: a peer is gone, which one?
FAILED_PAUSE_S = 5.0  # a failed peer's own exit is seen first by a parent that watches it (ChildWatcher)
_MARK = 10 ** 12  # added to a rank's count as it leaves: 1x finished, 2x failed
DONE, FAILED = 1, 2
_RUNS = itertools.count()  # the runs of this process (each rank runs the same sequence): one key space each


class Heartbeat(threading.Thread):
    """This rank's heartbeat and its watch over the others. `store`: used by the beat thread alone;
    `store_host`: who holds the store, for the line (`rank 0` or the torchrun agent) and its address;
    `quiet()`: true when another watcher already said this process's line; `probe`: the store's
    (host, port), connected to before each beat."""

    def __init__(self, store: Any, rank: int, world_size: int, grace_s: float, kept: str,
                 store_host: tuple[str, str] = ("rank 0", "?"), interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, quiet: Callable[[], bool] = lambda: False,
                 leave: Callable[[int], Any] = os._exit, prefix: Optional[str] = None,  # noqa: SLF001
                 probe: Optional[tuple[str, int]] = None):
        super().__init__(daemon=True, name="heartbeat-judge")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.grace_s, self.kept, self.interval_s = grace_s, kept, interval_s
        self.store_host, self.clock, self.quiet, self.leave = store_host, clock, quiet, leave
        self.prefix = prefix if prefix is not None else f"safety_mirage/heartbeat/{next(_RUNS)}/"
        self.peers = [r for r in range(world_size) if r != rank]
        self.probe = probe
        self.said: Optional[str] = None  # this process's line, once printed
        self._saying, self._spoken = False, threading.Event()
        self._lock, self._stopping, self._wake = threading.Lock(), threading.Event(), threading.Event()
        now = clock()
        self._counts: dict[int, int] = {}
        self._changed: dict[int, float] = {}  # when a peer's count last moved (at a read: skew-free)
        self._failed_seen: dict[int, float] = {}
        self._last_ok = now  # the last exchange that completed
        self._pending: Optional[float] = now  # when the exchange under way began (None between)
        self._store_error: Optional[str] = None
        self._claimed = ""  # "<rank> <line>" that rank claimed ("": none yet)
        self._claim: Optional[str] = None  # "<rank> <line>" of this rank, to offer
        self._claim_done = threading.Event()
        self._suspected = False
        self._mark = 0  # DONE or FAILED once this rank leaves
        self._beat = threading.Thread(target=self._beat_loop, daemon=True, name="heartbeat")

    def key(self, rank: int) -> str:
        return f"{self.prefix}{rank}"

    # -- the beat thread: the only user of `store` --------------------------------------------------
    def start(self) -> None:
        self._beat.start()
        super().start()

    def _beat_loop(self) -> None:
        if not self.exchange(first=True):
            return
        while not self._stopping.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._mark or not self.exchange():
                break
        if self._mark and self._store_error is None:
            self._leave_mark()

    def exchange(self, first: bool = False) -> bool:
        """One beat: this rank's count up by one, the others' counts and the claimed line read, and
        this rank's own line offered when it has one. False once the store has failed."""
        started = self.clock()
        with self._lock:
            self._pending = started
        try:
            self.probe_store()
            if first:  # every key exists from now on: a read never waits for a rank not yet beating
                for rank in range(self.world_size):
                    self.store.add(self.key(rank), 0)
                self.store.compare_set(self.key("claim"), "", "")
            self.store.add(self.key(self.rank), 1)
            values = self.store.multi_get([self.key(p) for p in self.peers] + [self.key("claim")])
            claim = self._claim
            if claim is not None and not values[-1]:
                values[-1] = self.store.compare_set(self.key("claim"), "", claim)
        except Exception as err:  # noqa: BLE001 -- the host gone: DistNetworkError, RuntimeError
            with self._lock:
                self._pending = None
                self._store_error = (str(err).strip().splitlines() or [type(err).__name__])[0]
            self._claim_done.set()
            return False
        now = self.clock()
        with self._lock:
            self._pending, self._last_ok = None, now
            for peer, value in zip(self.peers, values):
                count = int(value)
                if count != self._counts.get(peer, 0):
                    self._changed[peer] = now
                if count // _MARK == FAILED:
                    self._failed_seen.setdefault(peer, now)
                self._counts[peer] = count
            self._claimed = values[-1].decode() if isinstance(values[-1], bytes) else str(values[-1])
        if claim is not None:
            self._claim_done.set()
        return True

    def _leave_mark(self) -> None:
        """Mark this rank finished or failed; the store's host (rank 0) gives the others two beats
        to read it (less once they have all left) before its process, and the store, go."""
        try:
            self.store.add(self.key(self.rank), self._mark * _MARK)
            if self.rank != 0 or self.store_host[0] != "rank 0":
                return
            deadline = time.monotonic() + 2 * self.interval_s
            while time.monotonic() < deadline:
                values = self.store.multi_get([self.key(p) for p in self.peers])
                if all(int(v) // _MARK for v in values):
                    return
                time.sleep(self.interval_s / 10)
        except Exception:  # noqa: BLE001 -- leaving anyway
            return

    # -- the judge ------------------------------------------------------------------------------------
    def probe_store(self, timeout_s: Optional[float] = None) -> None:
        """Connect to the store's host, and leave: a host gone refuses it quietly, where a request on
        the open connection fails after torch's C++ client printed a warning and its stack."""
        if self.probe is not None:
            socket.create_connection(self.probe, timeout=timeout_s or self.grace_s).close()

    def suspect(self) -> None:
        """This rank's collective failed: a peer is gone. Judge with the short limit, and probe the
        store's host every tenth of a beat (no request: its host may be dying right now)."""
        with self._lock:
            self._suspected = True

    def verdict(self, now: float) -> Optional[tuple[str, bool]]:
        """(line, is_error) once something is lost, else None. Pure: the state the beat thread read."""
        with self._lock:
            claimed, counts, changed = self._claimed, dict(self._counts), dict(self._changed)
            last_ok, pending, error, suspected = self._last_ok, self._pending, self._store_error, self._suspected
            failed_seen = dict(self._failed_seen)
        if claimed and claimed != self._claim:
            return self._following(claimed), False
        limit = min(self.grace_s, SUSPECT_BEATS * self.interval_s) if suspected else self.grace_s
        for peer in self.peers:
            state = counts.get(peer, 0) // _MARK
            if state == FAILED and (error is not None or now - failed_seen[peer] >= FAILED_PAUSE_S):
                return f"rank {self.rank} stopped: rank {peer} stopped with an error (its own line says which)", False
            if state == 0 and peer in changed and last_ok - changed[peer] > limit:
                return (f"error: rank {peer}: no heartbeat for {last_ok - changed[peer]:.0f} s (killed, or its node "
                        f"lost?); {self.kept}"), True
        holder, address = self.store_host
        if holder == "rank 0" and counts.get(0, 0) // _MARK == DONE:
            return None  # rank 0 finished: its store goes with it
        silent = pending is not None and now - pending > self.grace_s  # a request that never returns
        if (error is not None and (suspected or now - last_ok > self.grace_s)) or silent:
            who = "rank 0: the job's store" if holder == "rank 0" else f"{holder}: the job's store"
            return (f"error: {who} at {address}, which it holds, stopped answering (killed, or its node lost?); "
                    f"{self.kept}"), True
        return None

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s / 2 if not self._suspected else self.interval_s / 10):
            if self._suspected and self._store_error is None:
                try:
                    self.probe_store(timeout_s=self.interval_s)
                except TimeoutError:
                    pass  # a slow network says nothing: the beat's own request decides
                except OSError as err:  # refused, reset, no route to the host
                    with self._lock:
                        self._store_error = str(err)
            found = self.verdict(self.clock())
            if found is None or self._stopping.is_set() or self.quiet():
                continue
            line = self.say(*found)
            self._stopping.set()
            if line == found[0] and found[1] and self.rank == 0 and self.store_host[0] == "rank 0":
                time.sleep(2 * self.interval_s)  # the others read the claimed line before the store goes
            sys.stdout.flush()
            self.leave(1)
            return

    def say(self, line: str, error: bool = True) -> str:
        """Print this process's one line (once): an error line is first offered to the other ranks
        (two beats at most); a rank that claimed another line first has it said instead."""
        with self._lock:
            first, self._saying = not self._saying, True
        if not first:  # another thread is saying this process's line
            self._spoken.wait(4 * self.interval_s)
            return self.said or line
        if error and self._beat.is_alive() and self._store_error is None:
            self._claim = f"{self.rank} {line}"
            self._wake.set()
            self._claim_done.wait(2 * self.interval_s)
            with self._lock:
                if self._claimed and self._claimed != self._claim:
                    line = self._following(self._claimed)
        print(line, file=sys.stderr, flush=True)
        self.said = line
        self._spoken.set()
        return line

    def _following(self, claimed: str) -> str:
        """This rank's line after another rank claimed `claimed` (its error line, said once)."""
        return f"rank {self.rank} stopped: {claimed.split(' ', 1)[1].removeprefix('error: ')}"

    def stop(self, clean: bool) -> None:
        """This rank leaves: finished (clean) or failed. Never blocks for long (the beat thread gets
        three beats to write the mark; it is a daemon either way)."""
        self._mark = self._mark or (DONE if clean else FAILED)
        self._stopping.set()
        self._wake.set()
        if self._beat.is_alive():
            self._beat.join(timeout=3 * self.interval_s)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval_s)


def start_heartbeat(grace_s: float, kept: str, quiet: Callable[[], bool] = lambda: False) -> Optional[Heartbeat]:
    """This rank's heartbeat over the default process group's store; None on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from torch.distributed.distributed_c10d import _get_default_store  # noqa: PLC2701 -- the job's own store

    store = _get_default_store()
    base = store
    while isinstance(base, dist.PrefixStore):
        base = base.underlying_store
    tcp = isinstance(base, dist.TCPStore)
    address = f"{base.host}:{base.port}" if tcp else type(base).__name__
    # torchrun's workers use its agent's store; everywhere else rank 0 holds it (env:// rendezvous)
    holder = "the torchrun agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
    heartbeat = Heartbeat(store.clone(), dist.get_rank(), dist.get_world_size(), grace_s, kept,
                          store_host=(holder, address), quiet=quiet, probe=(base.host, base.port) if tcp else None)
    heartbeat.start()
    return heartbeat
