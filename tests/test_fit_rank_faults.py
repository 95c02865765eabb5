"""A fault on one rank of a 2-process fit (gloo CPU processes; DDP, FSDP2 and DeepSpeed ZeRO-2): a rank that raises,
is killed by SIGKILL, or runs out of memory (a raised `torch.OutOfMemoryError`) ends the run in
one `error:` line naming the rank and the cause, within a bounded time, with no process left; the
checkpoint written before stays loadable, and the same command with resume=last ends with the
weights of an uninterrupted run (trainer.deterministic=true). Faults are planted with
SAFETY_MIRAGE_FAULT (lightning_modules/run/fault_injection.py); Lightning's launcher re-runs the
command line for rank 1, so every run is a CLI subprocess."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rank_kills import error_lines, none_left
from test_bad_inputs import REPO, cli_env
from vlguard_fixture import vlguard_overrides, write_vlguard

LIMIT_S = 150  # a fault must end the run well before this (a loaded 2-core machine included)
CAUSE = {"raise": "error: rank 1: RuntimeError: injected fault at step 3 (--debug shows the traceback)",
         "kill": "error: rank 1: killed by SIGKILL",
         "oom": "error: rank 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected); lower "
                "data.batch_size"}


def command(files: dict, run_dir: Path, trainer: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_modules.fit", "--config", "configs/demo.yaml",
            *vlguard_overrides(files, run_dir), f"trainer={trainer}", "trainer.devices=2", "trainer.max_steps=5",
            "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.deterministic=true", "checkpoint.every_n_train_steps=1",
            "optim.lr=0.01", "eval.test_at_end=false", "eval.val_at_start=false", "data.max_eval_samples=2",
            "threads=1", *extra]


def cli(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = dict(cli_env(), SAFETY_MIRAGE_FAULT=fault)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=2 * LIMIT_S)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = (run_dir / "model").glob("*.safetensors")
    return load_file(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_vlguard(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """The uninterrupted run of each strategy, made once."""
    runs = {}

    def get(trainer: str) -> dict[str, torch.Tensor]:
        if trainer not in runs:
            run_dir = tmp_path_factory.mktemp(f"straight_{trainer}") / "run"
            proc = cli(command(files, run_dir, trainer))
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[trainer] = weights(run_dir)
        return runs[trainer]

    return get


def faulted(args: list[str], run_dir: Path, fault: str, step: int) -> None:
    """The run with `fault` on rank 1 at `step` ends in one `error:` line naming rank 1 and the cause,
    within LIMIT_S, with no process of it left and no model exported."""
    start = time.monotonic()
    proc = cli(args, fault=f"rank1:{fault}@step{step}")
    took = time.monotonic() - start
    errors = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].startswith(CAUSE[fault].replace("step 3", f"step {step}")), errors
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert took < LIMIT_S
    assert none_left(str(run_dir))  # no rank outlives the run (a dying one gets 10 s)
    assert not (run_dir / "model").exists()


def resumed_to_the_end(args: list[str], run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    """resume=last finishes the run with exactly the uninterrupted run's weights."""
    proc = cli(args + ["resume=last"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Restored all states from the checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'}" in \
        proc.stdout + proc.stderr
    resumed = weights(run_dir)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.scale
# Each kind on two processes once more than here (CI time): DDP oom and FSDP kill run on three
# (test_fit_rank_faults_3.py), raise, kill and oom under DeepSpeed below.
@pytest.mark.parametrize("trainer,fault", [("ddp_cpu", "kill"), ("fsdp_cpu", "raise")])
def test_a_rank_fault_is_one_line_and_resume_gives_the_uninterrupted_weights(files, straight, tmp_path, trainer,
                                                                              fault):
    run_dir = tmp_path / "run"
    args = command(files, run_dir, trainer)
    faulted(args, run_dir, fault, step=3)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert 1 <= torch.load(last, weights_only=True)["global_step"] <= 3  # whole, written before the fault
    resumed_to_the_end(args, run_dir, straight(trainer))


@pytest.mark.slow
@pytest.mark.scale
def test_deepspeed_rank_faults_one_after_another_then_resume_gives_the_uninterrupted_weights(files, straight,
                                                                                              tmp_path):
    """DeepSpeed ZeRO-2 on two CPU processes (trainer=deepspeed_zero2_cpu), checkpoints as directories: a
    kill at step 2; resumed, a raise at step 3; resumed again, an out-of-memory at step 4 -- each one line,
    each leaving a whole checkpoint directory that the next run resumes from; the last resume ends with the
    uninterrupted weights. One run directory carries the three faults: 4 runs and the straight one, not 7."""
    from core.checkpoints import check_sharded_checkpoint
    from lightning_modules.run.checkpointing import saved_step

    run_dir = tmp_path / "run"
    args = command(files, run_dir, "deepspeed_zero2_cpu")
    last, before = run_dir / "checkpoints" / "last.ckpt", 0
    for fault, step in (("kill", 2), ("raise", 3), ("oom", 4)):
        faulted(args + (["resume=last"] if before else []), run_dir, fault, step)
        assert before < saved_step(last) <= step  # a newer checkpoint, written before the fault
        check_sharded_checkpoint(last)  # whole: every file of it loads (as data)
        before = saved_step(last)
    resumed_to_the_end(args, run_dir, straight("deepspeed_zero2_cpu"))


def test_a_malformed_fault_is_one_line(monkeypatch):
    from core.errors import UserError
    from lightning_modules.run.fault_injection import injected_faults

    monkeypatch.delenv("SAFETY_MIRAGE_FAULT", raising=False)
    assert injected_faults() == []
    monkeypatch.setenv("SAFETY_MIRAGE_FAULT", "rank1:explode@step3")
    with pytest.raises(UserError, match=r"SAFETY_MIRAGE_FAULT='rank1:explode@step3' is not a fault: give "
                                        r"rank<R>:<raise\|kill\|oom>@<step\|answer\|judge\|harvest><N>"):
        injected_faults()
    monkeypatch.setenv("SAFETY_MIRAGE_FAULT", "rank1:kill@step3")
    (fault,) = injected_faults()
    assert (fault.rank, fault.kind, fault.step) == (1, "kill", 3)
