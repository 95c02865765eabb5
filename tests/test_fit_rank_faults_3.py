"""Rank faults of a fit on three processes (gloo CPU; DDP and FSDP2), the middle rank and the last:
planted faults (SAFETY_MIRAGE_FAULT) that raise, SIGKILL or run out of memory, then SIGKILLs from
outside at seeded random moments, to a rank and to rank 0 (the parent of the others). Each ends in
one line within its limit with no process left, `last.ckpt` loads, and the same command
(resume=auto) ends with the weights of an uninterrupted 3-process run (atol 0).

Each test is a chain on one run directory: every fault resumes from what the one before left, and
one uninterrupted run per strategy serves them all (the runs cost ~40 s each on two loaded cores)."""

from __future__ import annotations

import time

import pytest
import torch

from rank_kills import assert_one_line_for_the_kill, error_lines, kill_plan, none_left, run_and_kill
from test_bad_inputs import REPO, cli_env
from test_fit_rank_faults import cli, command, weights
from vlguard_fixture import write_vlguard

LIMIT_S = 240  # a planted fault ends its run (start-up included) well before this
AFTER_KILL_S = 60  # a kill from outside ends the run this soon (documented: seconds; a loaded machine)
KEPT = "the checkpoints already written are kept: resume=last resumes"


def fit3(files, run_dir, trainer: str) -> list[str]:
    # 3 validation rows: one per rank; resume=auto: the same command starts, resumes, or finishes.
    return command(files, run_dir, trainer, "trainer.devices=3", "data.max_eval_samples=3", "resume=auto")


def planted_line(fault: str) -> str:
    """The one line a planted fault `rank<R>:<kind>@step<S>` ends the run with."""
    rank, rest = fault[4:].split(":")
    kind, step = rest.split("@step")
    return {"raise": f"error: rank {rank}: RuntimeError: injected fault at step {step} (--debug shows the traceback)",
            "kill": f"error: rank {rank}: killed by SIGKILL (out of memory? the kernel's OOM killer sends it); {KEPT}",
            "oom": f"error: rank {rank}: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected); "
                   "lower data.batch_size (trainer.accumulate_grad_batches keeps the effective batch) or set "
                   "model.gradient_checkpointing=true; the checkpoints written are kept: resume=last resumes "
                   "(--debug shows the traceback)"}[kind]


def saved_step(run_dir) -> int:
    """The step of last.ckpt (0: none yet), loaded whole."""
    last = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True)["global_step"] if last.exists() else 0


def same_weights(run_dir, expected: dict) -> None:
    resumed = weights(run_dir)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_vlguard(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The uninterrupted 3-process run of each strategy, made once: (weights, seconds it took)."""
    runs = {}

    def get(trainer: str):
        if trainer not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference_{trainer}") / "run"
            start = time.monotonic()
            proc = cli(fit3(files, run_dir, trainer))
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[trainer] = weights(run_dir), time.monotonic() - start
        return runs[trainer]

    return get


@pytest.mark.slow
@pytest.mark.scale
@pytest.mark.parametrize("trainer,faults", [("ddp_cpu", ("rank1:raise@step2", "rank2:oom@step4")),
                                            ("fsdp_cpu", ("rank2:kill@step2", "rank1:oom@step4"))])
def test_planted_faults_on_3_ranks_resume_to_the_uninterrupted_weights(files, reference, tmp_path, trainer, faults):
    run_dir = tmp_path / "run"
    args = fit3(files, run_dir, trainer)
    step = 0
    for fault in faults:
        start = time.monotonic()
        proc = cli(args, fault=fault)
        assert proc.returncode == 1 and error_lines(proc.stderr) == [planted_line(fault)], proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr and time.monotonic() - start < LIMIT_S
        assert none_left(str(run_dir))
        assert step < saved_step(run_dir) <= int(fault.split("@step")[1])  # whole, and further than before
        if step:
            assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
        step = saved_step(run_dir)
        assert not (run_dir / "model").exists()
    proc = cli(args)
    assert proc.returncode == 0 and "Restored all states from the checkpoint" in proc.stdout + proc.stderr, \
        proc.stderr[-4000:]
    same_weights(run_dir, reference(trainer)[0])


@pytest.mark.slow
@pytest.mark.scale
def test_kills_at_random_moments_of_a_3_rank_fit(files, reference, tmp_path):
    """SIGKILL from outside to rank 0, then (on the resumed run) to rank 1 or 2, each after a seeded
    random share of the uninterrupted run's time: in start-up, a step, a checkpoint write, anywhere."""
    expected, seconds = reference("ddp_cpu")
    run_dir = tmp_path / "run"
    args = fit3(files, run_dir, "ddp_cpu")
    env = dict(cli_env(), SAFETY_MIRAGE_FAULT="")
    # The second run resumes, with less to do. Rank 0 first: a run that ends before its kill skips the next.
    for label, ranks, run_s in (("fit, rank 0", [0], seconds), ("fit, a rank", [1, 2], 0.8 * seconds)):
        rank, delay = kill_plan(label, ranks, run_s)
        out = run_and_kill(args, env, REPO, rank, delay, 2 * LIMIT_S)
        finished = (run_dir / "model").exists()
        assert "Traceback" not in out.stderr, out.stderr[-4000:]
        if out.killed and not finished:
            assert_one_line_for_the_kill(out, rank, AFTER_KILL_S, label)
        assert none_left(str(run_dir)), (label, out.stderr[-4000:])
        saved_step(run_dir)  # loads whole
        if finished:  # the kill came after the model was saved: resume=auto would start a new run
            break
    else:
        proc = cli(args)
        assert proc.returncode == 0, proc.stderr[-4000:]
    same_weights(run_dir, expected)
