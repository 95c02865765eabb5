"""Sharded checkpoints (FSDP2's distributed checkpoint, a directory every rank writes into) go through
the same atomic and non-finite path as single files: written beside the old one and swapped in
whole; a full disk on one rank, a NaN in one rank's shard, or a kill mid-write leaves the previous
checkpoint whole and loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoints import check_sharded_checkpoint
from test_bad_inputs import REPO, cli_env

SCRIPT = REPO / "tests" / "sharded_fit.py"


def two_ranks(run_dir: Path, max_steps: int, fault: str, resume: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), str(run_dir), str(max_steps), fault] + ([str(resume)] if resume else [])
    return subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=400)


def published(run_dir: Path) -> tuple[int, list[str]]:
    """The step of checkpoints/last.ckpt and what else lies beside it."""
    checkpoints = run_dir / "checkpoints"
    step = json.loads((checkpoints / "last.ckpt" / "run_identity.json").read_text())["global_step"]
    return step, sorted(p.name for p in checkpoints.iterdir() if p.name != "last.ckpt")


@pytest.mark.slow
@pytest.mark.scale
def test_sharded_checkpoint_cut_by_a_full_disk_or_a_nan_shard_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1's shard write of the step-3 checkpoint fails with ENOSPC: both ranks stop with one line.
    proc = two_ranks(run_dir, 5, "full_disk")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 2, proc.stderr[-3000:]
    assert all(f"cannot write checkpoint {run_dir}/checkpoints/last.ckpt: No space left on device (disk full); the "
               "last complete checkpoint is kept" in line for line in errors), errors
    assert published(run_dir) == (2, [])  # the step-2 checkpoint, whole; no temporary directory left
    identity = json.loads((run_dir / "checkpoints" / "last.ckpt" / "run_identity.json").read_text())
    assert identity["world_size"] == 2 and identity["strategy"] == "AtomicModelParallelStrategy"
    check_sharded_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    # It loads: resumed from it, rank 1 holds a NaN in its shard of the step-4 checkpoint, which is refused
    # on every rank (the ranks agree), and the step-3 one is the last.
    proc = two_ranks(run_dir, 6, "nan", resume=run_dir / "checkpoints" / "last.ckpt")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 2, proc.stderr[-3000:]
    assert all("non-finite weights after step 4" in line and "checkpoint not written; the last one with finite "
               f"weights is {run_dir}/checkpoints/last.ckpt (step 3)" in line for line in errors), errors
    assert any("rank 1: non-finite weights after step 4 (model.0.weight)" in line for line in errors), errors
    assert any("rank 0: non-finite weights after step 4 (a tensor shard on another rank)" in line for line in errors)
    assert published(run_dir) == (3, [])


KILLED_WRITE = """
import os, signal, sys, torch
import torch.distributed.checkpoint as dcp
from pathlib import Path
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning_modules.run.checkpointing import atomic_directory_checkpoint

def write(checkpoint, target):
    dcp.save({"w": checkpoint["state_dict"]["w"]}, checkpoint_id=str(target), no_dist=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # mid-write: the shards are there, the swap is not

step = int(sys.argv[3])
atomic_directory_checkpoint(SingleDeviceStrategy(device="cpu"), {"state_dict": {"w": torch.full((4,), float(step))},
                            "global_step": step}, Path(sys.argv[1]), write)
"""


def _save(path: Path, step: int) -> None:
    import torch.distributed.checkpoint as dcp
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_modules.run.checkpointing import atomic_directory_checkpoint

    atomic_directory_checkpoint(
        SingleDeviceStrategy(device="cpu"), {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step},
        path, lambda ckpt, target: dcp.save({"w": ckpt["state_dict"]["w"]}, checkpoint_id=str(target), no_dist=True))


def _load(path: Path) -> float:
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.zeros(4)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return float(state["w"][0])


@pytest.mark.slow
@pytest.mark.scale
def test_a_kill_mid_write_leaves_the_previous_directory_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    _save(path, 1)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(path), "kill", "2"], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _load(path) == 1.0  # the previous checkpoint, whole and loadable
    assert (tmp_path / ".last.ckpt.tmp").is_dir()  # the killed write's shards, never published
    _save(path, 3)
    assert _load(path) == 3.0 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # the stale one cleaned up


def test_a_kill_between_the_renames_of_the_fallback_swap_loses_nothing(tmp_path, monkeypatch):
    """Where the filesystem cannot exchange two directories, the old one is moved aside first; a
    kill right then leaves it aside, and the next save (or resume) puts it back."""
    import lightning_modules.run.checkpointing as checkpointing

    path = tmp_path / "last.ckpt"
    _save(path, 1)

    def no_exchange(a, b):
        raise OSError(38, "Function not implemented")

    real_replace = os.replace

    def killed_on_the_second(src, dst):
        if Path(dst) == path and (tmp_path / ".last.ckpt.old").exists():
            raise KeyboardInterrupt  # the process dies between moving the old one aside and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing, "exchange_paths", no_exchange)
    monkeypatch.setattr(checkpointing.os, "replace", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _save(path, 2)
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    assert not path.exists() and _load(tmp_path / ".last.ckpt.old") == 1.0
    checkpointing.recover_checkpoint_dir(path)  # what the next save and check_sharded_checkpoint do first
    assert _load(path) == 1.0
    _save(path, 3)
    assert _load(path) == 3.0 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
