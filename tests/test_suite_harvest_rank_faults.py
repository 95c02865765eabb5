"""Rank faults of the evaluation suite and of the forget-set harvest on two processes: rank 1 is
SIGKILLed, then (on the resumed run) raises, both planted (SAFETY_MIRAGE_FAULT `@answer<N>`,
`@harvest<N>`). Each ends in one line naming rank 1 with no process left, and the same command then
writes the 1-process files byte for byte (suite: every task's samples.jsonl and task_results.csv,
and results.csv; harvest: the forget file)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import SMALL
from rank_kills import error_lines, none_left
from suite_fixture import suite_data
from test_generation_ranks import LIMIT_S, TINY, cli, ranks

KILLED = ("error: rank 1: killed by SIGKILL (out of memory? the kernel's OOM killer sends it); the answers already "
          "written are kept: run the same command to resume")


def raised(stage: str) -> str:
    return f"error: rank 1: RuntimeError: injected fault at {stage} batch 0 (--debug shows the traceback)"


def faulted_runs(args: list[str], chain: list[tuple[str, str]], marker: str) -> None:
    """`args` with each planted fault in turn: one line, within the limit, no process left."""
    for fault, line in chain:
        start = time.monotonic()
        proc = cli(args, env={"SAFETY_MIRAGE_FAULT": fault})
        assert proc.returncode == 1 and error_lines(proc.stderr) == [line], (fault, proc.stderr[-4000:])
        assert "Traceback" not in proc.stderr and time.monotonic() - start < LIMIT_S
        assert none_left(marker)
    proc = cli(args, env={"SAFETY_MIRAGE_FAULT": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.scale
def test_suite_rank_faults_resume_to_the_one_process_files(tmp_path):
    paths = suite_data(tmp_path / "data")
    base = [sys.executable, "-m", "lightning_modules.evaluate", "--config", "configs/evaluate/suite_tiny.yaml",
            *(f"evaluate.benchmarks.{k}={v}" for k, v in paths.items()), "eval.max_new_tokens=3",
            "data.eval_batch_size=4", "evaluate.max_samples=3", "evaluate.bootstrap=50", *TINY]
    proc = cli([*base, f"run_dir={tmp_path / 'one'}", *ranks(1)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Rank 1 answers batch 1 of each task with 2 or more (vlguard 5 batches: 1 and 3; mm_safetybench,
    # figstep, spa_vl_harm): killed before its 3rd, in mm_safetybench, it leaves figstep and
    # spa_vl_harm whole, where the resumed run's rank 1 raises before its first.
    faulted_runs([*base, f"run_dir={tmp_path / 'two'}", *ranks(2)],
                 [("rank1:kill@answer2", KILLED), ("rank1:raise@answer0", raised("answer"))], str(tmp_path / "two"))
    tasks = sorted(p.name for p in (tmp_path / "one" / "tasks").iterdir())
    for task in tasks:
        for name in ("samples.jsonl", "task_results.csv"):
            mine, ref = (tmp_path / d / "tasks" / task / name for d in ("two", "one"))
            assert mine.read_bytes() == ref.read_bytes(), (task, name)
    assert (tmp_path / "two" / "results.csv").read_bytes() == (tmp_path / "one" / "results.csv").read_bytes()


@pytest.mark.slow
@pytest.mark.scale
def test_harvest_rank_faults_resume_to_the_one_process_forget_file(tmp_path):
    base = [sys.executable, "-m", "lightning_modules.harvest", "--config", "configs/experiment/mirage_npo.yaml", *SMALL,
            f"paths.cache={tmp_path / 'cache'}", "data.world.n_base=20", "data.world.n_safety=40", "data.world.n_val=4",
            "data.world.n_test=4", "data.eval_batch_size=4", "data.forget_retain.harvest_keep=all"]
    proc = cli([*base, f"data.forget_retain.harvest_dir={tmp_path / 'one'}", *ranks(1)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 40 queries in 10 batches, rank 1 answers 5: killed before its 2nd, 4 stay for the resumed run.
    faulted_runs([*base, f"data.forget_retain.harvest_dir={tmp_path / 'two'}", *ranks(2)],
                 [("rank1:kill@harvest1", KILLED), ("rank1:raise@harvest0", raised("harvest"))], str(tmp_path / "two"))
    one, two = (sorted((tmp_path / d).glob("forget-*")) for d in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 2
    assert one[0].read_bytes() == two[0].read_bytes() and len(json.loads(one[0].read_text())) == 40
    assert not list((tmp_path / "two").glob(".partial-*"))
