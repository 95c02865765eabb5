"""A rank that vanishes where no parent watches it (run/heartbeat.py): two CPU ranks of `fit`
started as torchrun and srun start them (LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT: Lightning
launches nothing), one SIGKILLed from outside mid-training; and under Lightning's own launcher rank 0
itself killed, its rank 1 orphaned. The survivor says one line naming the lost rank (or the store
its holder took with it) within `trainer.strategy.heartbeat` + a few seconds, exits non-zero, no
process is left, and the checkpoint written before stays whole.

When rank 1 is killed, rank 0 is stuck in a long step (a sleep, as in an NCCL collective that never
returns; gloo's would fail at once): the heartbeat alone ends it, its main thread never waking."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_bad_inputs import REPO, cli_env
from rank_kills import alive
from test_fit_rank_faults import command
from test_slurm_fit import free_port
from vlguard_fixture import write_vlguard

GRACE_S = 5
LIMIT_S = GRACE_S + 10  # from the kill to the survivor's exit (a loaded 2-core machine included)
KEPT = "the checkpoints already written are kept: resume=last resumes"
EXTRA = (f"trainer.strategy={{name: ddp, heartbeat: {GRACE_S}}}", "trainer.max_steps=2000")
STUCK = '''"""fit, with rank 0 stuck in its third step (it writes STUCK_MARK first)."""
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from lightning_modules.methods.sft import SFTModule

real = SFTModule.training_step

def stuck(self, batch, batch_idx):
    if self.global_rank == 0 and self.global_step == 2:
        Path(os.environ["STUCK_MARK"]).touch()
        time.sleep(600)
    return real(self, batch, batch_idx)

SFTModule.training_step = stuck
from lightning_modules.fit import main
main()
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_vlguard(tmp_path_factory.mktemp("data"))


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=REPO, env={**cli_env(), **env}, stdout=subprocess.DEVNULL, stderr=out)


def when_training(run_dir: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Until the first checkpoint is written (the ranks are inside trainer.fit, beating)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint came"
        time.sleep(0.2)
    time.sleep(1)  # a few steps further


def leaves(proc: subprocess.Popen, killed_at: float) -> float:
    try:
        proc.wait(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return time.monotonic() - killed_at


def lines(log: Path) -> list[str]:
    """The lines a rank says about the run's end (its own error, or why it stopped)."""
    return [line for line in log.read_text().splitlines() if line.startswith(("error: ", "rank "))]


def no_rank_left(run_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while alive(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(str(run_dir))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= 1  # whole


@pytest.mark.slow
@pytest.mark.scale
@pytest.mark.parametrize("lost", [1, 0])
def test_a_rank_killed_under_torchrun_is_named_by_the_other(files, tmp_path, lost):
    run_dir, port, mark = tmp_path / "run", free_port(), tmp_path / "stuck"
    args = command(files, run_dir, "ddp_cpu", *EXTRA)
    if lost == 1:
        (tmp_path / "stuck.py").write_text(STUCK.format(repo=str(REPO)))
        args[1:3] = [str(tmp_path / "stuck.py")]  # for `-m lightning_modules.fit`
    procs = [start(args, tmp_path / f"rank{r}.log", LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), STUCK_MARK=str(mark)) for r in (0, 1)]
    when_training(run_dir, procs)
    while lost == 1 and not mark.exists():
        assert procs[0].poll() is None
        time.sleep(0.2)
    os.kill(procs[lost].pid, signal.SIGKILL)
    procs[lost].wait()
    survivor = 1 - lost
    took = leaves(procs[survivor], time.monotonic())
    said = lines(tmp_path / f"rank{survivor}.log")
    if lost == 1:
        assert len(said) == 1 and re.fullmatch(rf"error: rank 1: no heartbeat for \d+ s \(killed, or its node "
                                               rf"lost\?\); {KEPT}", said[0]), said
    else:  # rank 0 held the job's store (torch's env:// rendezvous): it went with it
        assert said == [f"error: rank 0: the job's store at 127.0.0.1:{port}, which it holds, stopped answering "
                        f"(killed, or its node lost?); {KEPT}"], said
    assert procs[survivor].returncode != 0 and took < LIMIT_S
    no_rank_left(run_dir)


@pytest.mark.slow
@pytest.mark.scale
def test_rank_zero_killed_under_lightnings_launcher_leaves_no_orphan(files, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "ranks.log"  # rank 1 inherits rank 0's stderr
    rank0 = start(command(files, run_dir, "ddp_cpu", *EXTRA), log)
    when_training(run_dir, [rank0])
    (rank1,) = set(alive(str(run_dir))) - {rank0.pid}
    os.kill(rank0.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rank0.wait()
    while rank1 in alive(str(run_dir)) and time.monotonic() - killed_at < LIMIT_S:
        time.sleep(0.2)
    assert time.monotonic() - killed_at < LIMIT_S
    said = lines(log)
    assert len(said) == 1 and said[0].startswith("error: rank 0: the job's store at 127.0.0.1:") and \
        said[0].endswith(f", which it holds, stopped answering (killed, or its node lost?); {KEPT}"), said
    no_rank_left(run_dir)
