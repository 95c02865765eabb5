"""Rank faults of `evaluate` (files mode, with the VLM judge) on three processes: faults planted in
the answering and the judging (SAFETY_MIRAGE_FAULT `@answer<N>`, `@judge<N>`) on the middle rank and
the last, then SIGKILLs from outside at seeded random moments, to a rank and to rank 0 (the parent of
the others). Each ends in one line within its limit with no process left, and the same command then
ends with the 1-process samples.jsonl, byte for byte, no answer asked twice.

Each test is a chain on one run directory (every fault resumes from what the one before left); the
planted faults are placed where the chain is sure to reach them (see the comments)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from rank_kills import assert_one_line_for_the_kill, error_lines, kill_plan, none_left, run_and_kill
from test_bad_inputs import REPO, cli_env
from test_generation_ranks import LIMIT_S, answered, cli, evaluate_args, files, results  # noqa: F401 -- fixture

KEPT = "the answers already written are kept: run the same command to resume"
AFTER_KILL_S = 60  # a kill from outside ends the run this soon (documented: seconds; a loaded machine)
# 22 answers in 11 batches of 2 (rank r answers r, r+3, ...); 16 judged in 8 batches.
CHAIN = [
    # rank 2 out of memory before its 2nd answer batch (batch 5): its batches 5 and 8 stay to answer,
    ("rank2:oom@answer1", "error: rank 2: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
     "(injected); lower data.eval_batch_size (or evaluate.judge.batch_size); the answers written are kept: the "
     "same command resumes (--debug shows the traceback)"),
    # so the resumed run has 2 batches at least, rank 1 one of them;
    ("rank1:kill@answer0", f"error: rank 1: killed by SIGKILL (out of memory? the kernel's OOM killer sends it); {KEPT}"),
    # the next one answers the rest, then judges 8 batches (none judged yet): rank 2's first is batch 2;
    ("rank2:kill@judge0", f"error: rank 2: killed by SIGKILL (out of memory? the kernel's OOM killer sends it); {KEPT}"),
    # rank 2's 4 answers stay to judge: 2 batches at least, rank 1 one of them.
    ("rank1:raise@judge0", "error: rank 1: RuntimeError: injected fault at judge batch 0 (--debug shows the traceback)"),
]


def evaluate3(data, run_dir) -> list[str]:
    return [sys.executable, "-m", "lightning_modules.evaluate", *evaluate_args(data, run_dir, 3)]


def same_as_reference(run_dir, reference) -> None:
    assert (run_dir / "samples.jsonl").read_bytes() == (reference / "samples.jsonl").read_bytes()
    assert results(run_dir)["rows"] == results(reference)["rows"]
    judged = sorted((reference / "judge_cache.jsonl").read_text().splitlines())
    assert sorted((run_dir / "judge_cache.jsonl").read_text().splitlines()) == judged  # each judged once
    assert not list(run_dir.glob("*.rank*.jsonl"))


@pytest.mark.slow
@pytest.mark.scale
def test_planted_faults_in_answering_and_judging_on_3_ranks(files, tmp_path):
    run_dir = tmp_path / "run"
    args = evaluate3(files, run_dir)
    before = set()
    for fault, line in CHAIN:
        start = time.monotonic()
        proc = cli(args, env={"SAFETY_MIRAGE_FAULT": fault})
        assert proc.returncode == 1 and error_lines(proc.stderr) == [line], (fault, proc.stderr[-4000:])
        assert "Traceback" not in proc.stderr and time.monotonic() - start < LIMIT_S
        assert none_left(str(run_dir))
        assert before <= answered(run_dir) and not (run_dir / "results.csv").exists()  # kept, and not finished
        before = answered(run_dir)
    assert len(before) == 22  # every answer was in before the judge faults
    proc = cli(args, env={"SAFETY_MIRAGE_FAULT": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run_dir / "results.json").read_text())["generated_this_run"] == 0
    same_as_reference(run_dir, files["reference"])


@pytest.mark.slow
@pytest.mark.scale
def test_kills_at_random_moments_of_a_3_rank_evaluate(files, tmp_path):
    """SIGKILL from outside to rank 0, then (on the resumed run) to rank 1 or 2, each at a seeded
    random moment of the run: start-up, answering, judging, writing the tables, anywhere."""
    run_dir = tmp_path / "run"
    args = evaluate3(files, run_dir)
    env = dict(cli_env(), SAFETY_MIRAGE_FAULT="")
    # About how long 3 processes take uninterrupted here (their start-up is most of it); the second
    # run resumes, with less to do. Rank 0 first: a run that ends before its kill skips the next.
    for label, ranks, run_s in (("evaluate, rank 0", [0], 2 * files["seconds"]),
                                ("evaluate, a rank", [1, 2], 1.5 * files["seconds"])):
        rank, delay = kill_plan(label, ranks, run_s)
        out = run_and_kill(args, env, REPO, rank, delay, 2 * LIMIT_S)
        assert "Traceback" not in out.stderr, out.stderr[-4000:]
        if out.killed and not (run_dir / "results.csv").exists():
            assert_one_line_for_the_kill(out, rank, AFTER_KILL_S, label)
        assert none_left(str(run_dir)), (label, out.stderr[-4000:])
        if (run_dir / "results.csv").exists():
            break
    proc = cli(args, env={"SAFETY_MIRAGE_FAULT": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    same_as_reference(run_dir, files["reference"])
