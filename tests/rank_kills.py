"""Kills from outside, at a moment the code does not choose, for the rank-fault tests: a seeded
random delay after the command starts, then SIGKILL to rank 0 (the process the test started, the
parent of the other ranks under Lightning's launcher) or to rank R (its child with LOCAL_RANK=R).
The seed is printed (pytest shows it with a failure); SAFETY_MIRAGE_KILL_SEED=N replays it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SEED = int(os.environ.get("SAFETY_MIRAGE_KILL_SEED") or random.SystemRandom().randrange(10**6))


def kill_plan(label: str, ranks: list[int], run_s: float) -> tuple[int, float]:
    """(rank, delay): one of `ranks`, and a share (10-90 %) of `run_s` (how long the command runs
    uninterrupted on this machine), drawn from the seed and `label` (every test draws its own)."""
    rng = random.Random(f"{SEED}-{label}")
    rank, share = rng.choice(ranks), rng.uniform(0.1, 0.9)
    print(f"{label}: SIGKILL to rank {rank} after {share:.0%} of {run_s:.0f} s (SAFETY_MIRAGE_KILL_SEED={SEED})",
          flush=True)
    return rank, share * run_s


def ranks_of(pid: int) -> dict[int, int]:
    """The ranks Lightning's launcher started from `pid`: local rank -> pid."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            if env.get("LOCAL_RANK", "").isdigit():
                found[int(env["LOCAL_RANK"])] = int(proc.name)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    killed: bool  # False: the command ended (or rank R had left) before the kill
    others: int  # how many other ranks were running when it was killed
    after_kill_s: float  # from the kill until every rank had closed its output


def run_and_kill(args: list[str], env: dict, cwd: Path, rank: int, delay_s: float, limit_s: float) -> Outcome:
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + delay_s
    target = None
    while target is None:
        try:  # communicate drains the pipes while we wait (a full pipe would stall the ranks)
            out, err = proc.communicate(timeout=max(0.05, deadline - time.monotonic()))
            return Outcome(proc.returncode, out, err, False, 0, 0.0)
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= deadline:
            target = proc.pid if rank == 0 else ranks_of(proc.pid).get(rank)  # not started yet: wait for it
    others = len(ranks_of(proc.pid)) - (rank != 0)
    try:
        os.kill(target, signal.SIGKILL)
    except ProcessLookupError:  # it left just now: the command goes on to its end
        out, err = proc.communicate(timeout=limit_s)
        return Outcome(proc.returncode, out, err, False, 0, 0.0)
    start = time.monotonic()
    out, err = proc.communicate(timeout=limit_s)  # ends when every rank has closed its output
    outcome = Outcome(proc.returncode, out, err, True, others, time.monotonic() - start)
    print(f"killed rank {rank} ({others} other rank(s) running): every rank gone {outcome.after_kill_s:.1f} s later, "
          f"status {proc.returncode}, {error_lines(err)}", flush=True)
    return outcome


def alive(marker: str) -> list[int]:
    """Processes whose command line names `marker` (the run's directory: every rank carries it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def none_left(marker: str, wait_s: float = 10) -> bool:
    """No process of the run outlives it (a dying one gets `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while alive(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not alive(marker)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_for_the_kill(out: "Outcome", rank: int, within_s: float, label: str) -> None:
    """A kill from outside ended the run within `within_s` in the one line that names it: rank 0 names a
    killed rank; an orphan names a killed rank 0 (no line if rank 0 had started no other rank)."""
    assert out.after_kill_s < within_s, (label, out.after_kill_s)
    lines = error_lines(out.stderr)
    cause = f"error: rank {rank}: killed by SIGKILL (" if rank else "error: rank 0: gone (pid "
    assert len(lines) == int(rank > 0 or out.others > 0), out.stderr[-4000:]
    assert all(line.startswith(cause) for line in lines), out.stderr[-4000:]
