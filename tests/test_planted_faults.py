"""The machinery of the rank-fault tests, fast: the SAFETY_MIRAGE_FAULT grammar (core/faults.py) and
its one-line error, a fault firing at the batch of the stage it names, and an orphaned rank leaving
when its rank 0 is killed (core/parent_watch.py). The multi-process scenarios: test_*rank_faults*.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from core.faults import PlantedFault, fault_point, planted_fault
from test_bad_inputs import REPO


def test_the_grammar_and_a_malformed_fault(monkeypatch):
    monkeypatch.delenv("SAFETY_MIRAGE_FAULT", raising=False)
    assert planted_fault() is None
    monkeypatch.setenv("SAFETY_MIRAGE_FAULT", "rank2:oom@judge0")
    assert planted_fault() == PlantedFault(2, "oom", "judge", 0)
    for bad in ("rank1:kill@batch3", "rank1:kill", "1:kill@step3"):
        monkeypatch.setenv("SAFETY_MIRAGE_FAULT", bad)
        with pytest.raises(UserError, match=rf"SAFETY_MIRAGE_FAULT='{bad}' is not a fault: give rank<R>:"
                                            r"<raise\|kill\|oom>@<step\|answer\|judge\|harvest><N>, e\.g\. "):
            planted_fault()


def test_a_malformed_fault_stops_a_command_in_one_line(monkeypatch, capsys):
    from lightning_modules.harvest import main

    monkeypatch.setenv("SAFETY_MIRAGE_FAULT", "rank1:explode@answer0")
    with pytest.raises(SystemExit) as stop:
        main(["--config", "configs/experiment/mirage_npo.yaml", "run_dir=/nonexistent/never-written"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: SAFETY_MIRAGE_FAULT='rank1:explode@answer0' is not a fault")


def test_a_fault_fires_at_the_batch_of_its_stage_and_rank(monkeypatch):
    import core.faults

    monkeypatch.setattr(core.faults, "_STARTED", core.faults.Counter())
    monkeypatch.setenv("SAFETY_MIRAGE_FAULT", "rank1:raise@answer1")
    fault_point("answer", 1)  # batch 0
    fault_point("judge", 1)  # another stage counts on its own
    fault_point("judge", 1)
    with pytest.raises(RuntimeError, match=r"^injected fault at answer batch 1$"):
        fault_point("answer", 1)
    fault_point("answer", 1)  # once only
    monkeypatch.setenv("SAFETY_MIRAGE_FAULT", "rank0:oom@harvest0")
    fault_point("harvest", 1)  # another rank's batch 0 (one process is one rank: the count goes on)
    monkeypatch.setattr(core.faults, "_STARTED", core.faults.Counter())
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate 2\.00 GiB \(injected\)"):
        fault_point("harvest", 0)


LAUNCH = """import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
if os.environ.get("LOCAL_RANK") == "1":  # a rank Lightning's launcher started, stuck for good
    from core.errors import cli_main
    cli_main(lambda argv: time.sleep(600))([])
else:  # rank 0: names itself to the rank it starts, then waits to be killed
    from core.parent_watch import launching
    with launching():
        child = subprocess.Popen([sys.executable, __file__], env=dict(os.environ, LOCAL_RANK="1"))
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_an_orphaned_rank_leaves_in_one_line_when_rank_0_is_killed(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "SAFETY_MIRAGE_LAUNCHER")}
    rank0 = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    child = int(rank0.stdout.readline())
    time.sleep(1)  # the child has started watching
    os.kill(rank0.pid, signal.SIGKILL)
    start = time.monotonic()
    _, err = rank0.communicate(timeout=30)  # the pipes close when the orphan has gone too
    assert time.monotonic() - start < 5, err
    assert err.startswith(f"error: rank 0: gone (pid {rank0.pid} ended without a word: killed by a signal? "
                          "SIGKILL, or the kernel's OOM killer); the other ranks stop; what was written is kept: "
                          "the same command resumes"), err
    assert err.count("\n") == 1
    deadline = time.monotonic() + 5  # its pipes close as it exits: a busy machine may show it running a moment
    while True:
        try:  # gone, or a zombie that nobody has reaped yet
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z", "X") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state in ("gone", "Z", "X")
