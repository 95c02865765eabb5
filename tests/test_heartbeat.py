"""The ranks' heartbeat (lightning_modules/run/heartbeat.py), in one process: its judgement on a
HashStore with a fake clock (a beat is an `exchange`, called by hand), then real threads on a
TCPStore beside a long matmul. Nothing here starts a process; test_heartbeat_ranks.py does."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from core.errors import UserError
from lightning_modules.config.trainer import HEARTBEAT_S, heartbeat_grace
from lightning_modules.run.heartbeat import FAILED_PAUSE_S, Heartbeat

KEPT = "the checkpoints already written are kept: resume=last resumes"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Flaky:
    """A store whose host can die: every call raises once `dead`, as a TCPStore client's does."""

    def __init__(self, store):
        self.store, self.dead = store, False

    def __getattr__(self, name):
        def call(*args):
            if self.dead:
                raise dist.DistNetworkError("Connection reset by peer")
            return getattr(self.store, name)(*args)
        return call


def ranks(store, clock, world: int = 2, grace: float = 5, **kw) -> list[Heartbeat]:
    return [Heartbeat(store, r, world, grace, KEPT, store_host=("rank 0", "10.0.0.1:29500"), clock=clock,
                      prefix="t/", **kw) for r in range(world)]


def beat(clock: Clock, *heartbeats: Heartbeat, seconds: int = 1, first: bool = False) -> None:
    for _ in range(seconds):
        clock.t += 1
        for hb in heartbeats:
            hb.exchange(first=first)
        first = False


def test_a_rank_that_stops_beating_is_named_after_the_grace():
    clock = Clock()
    hb0, hb1 = ranks(dist.HashStore(), clock)
    beat(clock, hb0, hb1, first=True)
    beat(clock, hb0, hb1, seconds=2)  # rank 1 seen beating: watched from now on
    beat(clock, hb0, seconds=6)  # the first of these reads rank 1's last beat
    assert hb0.verdict(clock()) is None  # 5 s without a new count: not yet more than the grace
    beat(clock, hb0)
    assert hb0.verdict(clock()) == (f"error: rank 1: no heartbeat for 6 s (killed, or its node lost?); {KEPT}", True)


def test_a_failed_collective_shortens_the_wait_to_three_beats():
    clock = Clock()
    hb0, hb1 = ranks(dist.HashStore(), clock, grace=30)
    beat(clock, hb0, hb1, seconds=2, first=True)
    beat(clock, hb0, seconds=5)
    assert hb0.verdict(clock()) is None
    hb0.suspect()
    assert hb0.verdict(clock())[0].startswith("error: rank 1: no heartbeat for 4 s")


def test_a_rank_that_never_beat_is_not_judged():
    """A rank is watched from its first beat (one still loading its data is not lost)."""
    clock = Clock()
    hb0, _ = ranks(dist.HashStore(), clock)
    beat(clock, hb0, seconds=60, first=True)
    assert hb0.verdict(clock()) is None


def test_a_rank_that_finished_is_never_lost_and_one_that_failed_is_said_after_a_pause():
    clock = Clock()
    store = dist.HashStore()
    hb0, hb1, hb2 = ranks(store, clock, world=3)
    beat(clock, hb0, hb1, hb2, seconds=2, first=True)
    hb1._mark = 1  # what stop(clean=True) writes from the beat thread
    hb1._leave_mark()
    beat(clock, hb0, hb2, seconds=60)
    assert hb0.verdict(clock()) is None
    hb2._mark = 2  # stop(clean=False): its own line says why
    hb2._leave_mark()
    beat(clock, hb0)
    assert hb0.verdict(clock()) is None  # its parent, if it has one, says it first
    beat(clock, hb0, seconds=int(FAILED_PAUSE_S))
    assert hb0.verdict(clock()) == ("rank 0 stopped: rank 2 stopped with an error (its own line says which)", False)


def test_a_lost_store_names_its_holder_after_the_grace_or_at_once_after_a_failed_collective():
    clock = Clock()
    store = Flaky(dist.HashStore())
    hb0, hb1 = ranks(store, clock)
    beat(clock, hb0, hb1, seconds=2, first=True)
    store.dead = True  # rank 0, which holds it, killed
    beat(clock, hb1)
    line = f"error: rank 0: the job's store at 10.0.0.1:29500, which it holds, stopped answering (killed, or its node lost?); {KEPT}"
    assert hb1.verdict(clock()) is None  # rank 0 may have finished a moment ago: this rank's own end is near too
    clock.t += 6
    assert hb1.verdict(clock()) == (line, True)
    clock.t -= 6
    hb1.suspect()
    assert hb1.verdict(clock()) == (line, True)


def test_a_refused_connection_is_a_lost_store_without_a_request():
    """Each beat first connects to the store's host: a host gone refuses it, and no request on the
    open connection fails (torch's client prints a warning and a C++ stack for that)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nobody listens here once it is closed
    clock = Clock()
    hb1 = Heartbeat(dist.HashStore(), 1, 2, 5, KEPT, clock=clock, probe=("127.0.0.1", port))
    assert hb1.exchange(first=True) is False
    hb1.suspect()
    assert hb1.verdict(clock())[0].startswith("error: rank 0: the job's store at ?, which it holds, stopped answering")


def test_after_a_failed_collective_the_threads_say_the_line_and_leave(capfd):
    """The whole path on real threads: suspected, the judge finds the store's host gone, says the
    one line and leaves (os._exit in a run; recorded here)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    left: list[int] = []
    hb1 = Heartbeat(dist.HashStore(), 1, 2, 30, KEPT, store_host=("rank 0", f"127.0.0.1:{port}"), interval_s=0.05,
                    probe=("127.0.0.1", port), leave=left.append)
    hb1.start()
    time.sleep(0.3)
    assert not left  # a store error alone waits the grace: rank 0 may just have finished
    hb1.suspect()
    deadline = time.monotonic() + 5
    while not left and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left == [1]
    assert capfd.readouterr().err.splitlines() == [
        f"error: rank 0: the job's store at 127.0.0.1:{port}, which it holds, stopped answering (killed, or its node "
        f"lost?); {KEPT}"]


def test_a_store_gone_after_its_holder_finished_is_no_fault():
    clock = Clock()
    store = Flaky(dist.HashStore())
    hb0, hb1 = ranks(store, clock, interval_s=0.01)  # rank 0 waits two beats for rank 1 to read its mark
    beat(clock, hb0, hb1, seconds=2, first=True)
    hb0._mark = 1
    hb0._leave_mark()
    beat(clock, hb1)
    store.dead = True
    beat(clock, hb1)
    clock.t += 60
    hb1.suspect()
    assert hb1.verdict(clock()) is None


def test_a_store_that_never_answers_is_named_too():
    """A host frozen or cut off: the request never returns (the beat thread is stuck in it)."""
    clock = Clock()
    hb1 = Heartbeat(dist.HashStore(), 1, 2, 5, KEPT, store_host=("the torchrun agent", "node7:29400"), clock=clock)
    clock.t += 6
    assert hb1.verdict(clock()) == ("error: the torchrun agent: the job's store at node7:29400, which it holds, stopped "
                                    f"answering (killed, or its node lost?); {KEPT}", True)


def test_the_first_rank_to_say_it_claims_the_line_and_the_others_follow(capfd):
    """Three ranks on real threads; rank 2 dies without a word: one error line in the process set,
    the other survivor's line names the same cause."""
    store = dist.HashStore()
    left: list[int] = []
    hbs = [Heartbeat(store, r, 3, 0.6, KEPT, interval_s=0.05, prefix="c/", leave=lambda code, r=r: left.append(r))
           for r in range(3)]
    for hb in hbs:
        hb.start()
    time.sleep(0.3)
    hbs[2]._stopping.set()  # dead: no more beats, and no mark
    deadline = time.monotonic() + 10
    while len(left) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(left) == [0, 1]
    lines = capfd.readouterr().err.strip().splitlines()
    claimer, other = sorted(hbs[:2], key=lambda hb: not hb.said.startswith("error: "))
    assert claimer.said.startswith("error: rank 2: no heartbeat for ") and claimer.said.endswith(KEPT)
    assert other.said == f"rank {other.rank} stopped: " + claimer.said.removeprefix("error: ")
    assert sorted(lines) == sorted([claimer.said, other.said])


def test_a_long_matmul_does_not_starve_the_beat_and_a_clean_stop_ends_the_threads():
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)
    clients = [dist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=10)) for _ in range(2)]
    left: list[int] = []
    hbs = [Heartbeat(clients[r], r, 2, 1.0, KEPT, interval_s=0.1, prefix="m/", leave=left.append,
                     probe=("127.0.0.1", server.port)) for r in range(2)]
    for hb in hbs:
        hb.start()
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # every core busy in the kernel
    try:
        a = torch.randn(1500, 1500)
        start = time.monotonic()
        while time.monotonic() - start < 3:  # 30 grace periods of one long step
            a = torch.tanh(a @ a)
    finally:
        torch.set_num_threads(before)
    assert not left and all(hb.said is None for hb in hbs)
    assert int(server.get("m/0")) >= 15 and int(server.get("m/1")) >= 15  # it kept beating
    start = time.monotonic()
    for hb in reversed(hbs):
        hb.stop(clean=True)
    assert time.monotonic() - start < 1 and not any(hb.is_alive() or hb._beat.is_alive() for hb in hbs)
    assert int(server.get("m/0")) // 10 ** 12 == 1 == int(server.get("m/1")) // 10 ** 12  # finished, not lost
    assert not left


def test_the_grace_is_seconds_next_to_the_collective_timeout():
    from lightning_modules.run.strategies import build_strategy

    assert heartbeat_grace("ddp") == heartbeat_grace(None) == heartbeat_grace({"name": "fsdp"}) == HEARTBEAT_S
    assert heartbeat_grace({"name": "ddp", "heartbeat": 5}) == 5.0
    assert build_strategy({"name": "ddp", "heartbeat": 5, "timeout": 60})._timeout == timedelta(seconds=60)
    for bad in (2, 0, -1, "soon", True, None):
        with pytest.raises(UserError, match=rf"^invalid value for config key 'trainer.strategy.heartbeat': "
                                            rf"{bad!r} \(allowed: a number of seconds >= 3\)$"):
            heartbeat_grace({"name": "ddp", "heartbeat": bad})
