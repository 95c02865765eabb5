"""Resume after a crash: a run SIGKILLed mid-epoch and resumed with `resume=last` ends with the same
weights as an uninterrupted run (SFT with LoRA dropout, NPO with its cached reference, RMU);
checkpoint writes are atomic; the train loader resumes mid-epoch."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from datamodules.samplers import ResumableDataLoader
from lightning_modules.checkpointing import AtomicCheckpointIO
from test_bad_inputs import REPO, TIMEOUT_S, cli_env
from vlguard_fixture import vlguard_overrides, write_vlguard


# -- the loader ------------------------------------------------------------------------------------
def loader(n: int = 23, epoch: int = 0) -> ResumableDataLoader:
    sampler = DistributedSampler(list(range(n)), num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(list(range(n)), batch_size=4, sampler=sampler, collate_fn=list)


def test_loader_resumes_mid_epoch():
    full = list(loader())
    assert len(full) == 6 and sorted(sum(full, [])) == list(range(23))
    first = loader()
    it = iter(first)
    seen = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 4}
    second = loader()
    second.load_state_dict(state)
    rest = list(second)
    assert seen + rest == full
    assert second.state_dict() == {"epoch": 0, "batches": 6}
    assert list(second) == full  # the skip applies to one pass only


def test_loader_state_of_another_epoch_skips_nothing():
    resumed = loader(epoch=1)
    resumed.load_state_dict({"epoch": 0, "batches": 6})  # saved when epoch 0 had just ended
    assert list(resumed) == list(loader(epoch=1))


# -- atomic writes ---------------------------------------------------------------------------------
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1

    def crash(*args, **kwargs):  # the process dies between writing the temp file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind


# -- kill and resume, end to end -------------------------------------------------------------------
METHODS = {
    # LoRA with dropout: the resumed run must also draw the same dropout masks (PerBatchSeed).
    # 36 training rows / batch 4 = 9 batches an epoch; checkpoints every 5 steps land mid-epoch.
    "sft": (["model.finetune=lora", "model.lora.dropout=0.1"], 9),
    # Full fine-tuning: the reference NLL of every forget row is cached before the first update and
    # must come back from the checkpoint, not be recomputed against the moved policy.
    "npo": (["method=npo"], 6),
    # The control vector is a buffer saved with the weights; the reference is a snapshot.
    "rmu": (["method=rmu"], 6),
}


def fit_command(files: dict, run_dir: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_modules.fit", "--config", "configs/demo.yaml",
            *vlguard_overrides(files, run_dir), *METHODS[method][0], "trainer.max_steps=24",
            "checkpoint.every_n_train_steps=5", "trainer.deterministic=true", "optim.lr=0.01",
            "trainer.val_check_interval=7", "data.max_eval_samples=2", "eval.test_at_end=false", *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = (run_dir / "model").glob("*.safetensors")
    return load_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_killed_run_resumes_to_the_same_weights(method, tmp_path):
    files = write_vlguard(tmp_path / "data")
    env = cli_env()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # RMU runs every command with resume=auto (what a requeued cluster job uses): without a
    # checkpoint it starts fresh, with one it resumes.
    first, again = (["resume=auto"], "resume=auto") if method == "rmu" else ([], "resume=last")
    subprocess.run(fit_command(files, straight, method, *first), cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=TIMEOUT_S)

    proc = subprocess.Popen(fit_command(files, killed, method, *first), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + TIMEOUT_S
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    ckpt = torch.load(last, weights_only=True)
    step, per_epoch = ckpt["global_step"], METHODS[method][1]
    assert 0 < step < 24 and step % per_epoch != 0, f"not killed mid-epoch (step {step})"
    position = {"epoch": step // per_epoch, "batches": step % per_epoch}
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]
    if method == "npo":
        assert ckpt["reference_nll"]
    assert not (killed / "model").exists()

    proc = subprocess.run(fit_command(files, killed, method, again), cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    # A fresh rerun would end with the same weights too: make sure this one resumed.
    assert f"Restored all states from the checkpoint at {last}" in proc.stdout + proc.stderr
    expected, resumed = weights(straight), weights(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert torch.load(last, weights_only=True)["global_step"] == 20  # the last multiple of every_n_train_steps
