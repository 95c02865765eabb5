"""Resume after a crash: a run SIGKILLed mid-epoch and resumed with `resume=last` ends with the same
weights as an uninterrupted run (SFT with LoRA dropout, NPO with its cached reference, RMU);
checkpoint writes are atomic; the train loader resumes mid-epoch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faults import full_disk
from torch.utils.data import DistributedSampler

from datamodules.samplers import ResumableDataLoader
from lightning_modules.run.checkpointing import AtomicCheckpointIO
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
@pytest.mark.scale
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


# -- faults: finished runs, divergence, corrupt and partial writes ---------------------------------
def _fit(argv, capfd):
    from lightning_modules.fit import main
    from test_bad_inputs import invoke

    return invoke(main, argv, capfd)


def _args(files: dict, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", *vlguard_overrides(files, run_dir), "trainer.max_steps=2",
            "checkpoint.every_n_train_steps=2", "data.max_eval_samples=2", *extra]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SAFETY_MIRAGE_RUN_DIR", raising=False)


def _files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "tensorboard" not in p.parts and p.name != ".lock"}


@pytest.mark.slow
def test_resume_of_a_finished_run(tmp_path, capfd, in_repo):
    """resume=last on a finished run says so (exit 2, nothing touched); with a larger max_steps it
    trains on, and the earlier results move to finished-step<N>/."""
    files, run = write_vlguard(tmp_path / "data"), tmp_path / "run"
    status, err = _fit(_args(files, run), capfd)
    assert status == 0, err[-2000:]
    finished = _files_of(run)
    status, err = _fit(_args(files, run, "resume=last"), capfd)
    assert status == 2 and "Traceback" not in err
    assert f"error: run {run} is finished (checkpoint at step 2" in err
    assert _files_of(run) == finished
    status, err = _fit(_args(files, run, "resume=last", "trainer.max_steps=4"), capfd)
    assert status == 0, err[-2000:]
    assert (run / "finished-step2" / "results.csv").read_bytes() == finished["results.csv"]
    assert (run / "finished-step2" / "model").is_dir() and (run / "results.csv").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_divergence_keeps_a_resumable_checkpoint(tmp_path, capfd, in_repo, monkeypatch):
    """Weights turned NaN by the 4th update: the step-4 checkpoint is not written, the message names
    the kept one (step 2, finite), and resuming from it runs to the end."""
    from lightning_modules.methods.sft import SFTModule

    real_step = SFTModule.optimizer_step

    def poisoning_step(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        if self.global_step == 3:  # the 4th update
            next(self.model.parameters()).data.fill_(float("nan"))

    files, run = write_vlguard(tmp_path / "data"), tmp_path / "run"
    monkeypatch.setattr(SFTModule, "optimizer_step", poisoning_step)
    status, err = _fit(_args(files, run, "trainer.max_steps=6", "eval.test_at_end=false"), capfd)
    assert status == 2 and "Traceback" not in err, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "non-finite weights after step 4" in line and f"{run}/checkpoints/last.ckpt (step 2)" in line
    kept = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 2 and all(torch.isfinite(t).all() for t in kept["state_dict"].values())
    monkeypatch.setattr(SFTModule, "optimizer_step", real_step)
    status, err = _fit(_args(files, run, "trainer.max_steps=6", "eval.test_at_end=false", "resume=last"), capfd)
    assert status == 0, err[-2000:]
    assert all(torch.isfinite(t).all() for t in weights(run).values())


@pytest.mark.slow
def test_divergence_with_finite_but_destroyed_weights_keeps_the_checkpoint_that_trains(tmp_path, capfd, in_repo):
    """lr 1e30: one update gives finite, enormous weights and the next loss is NaN. The checkpoint of
    that update is discarded (its weights gave the NaN); last.ckpt is the one before it, and
    resume=last with the configured (sane) learning rate trains to the end from it."""
    files, run = write_vlguard(tmp_path / "data"), tmp_path / "run"
    args = ["trainer.max_steps=6", "checkpoint.every_n_train_steps=1", "eval.test_at_end=false"]
    status, err = _fit(_args(files, run, *args, "optim.lr=1e30"), capfd)
    assert status == 2 and "Traceback" not in err, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "non-finite loss at step 2" in line and "the checkpoint of step 2 (finite weights that gave this loss) " \
        f"was discarded; last good checkpoint kept: resume from {run}/checkpoints/last.ckpt (step 1, the last one " \
        "whose next step had a " \
        "finite loss)" in line, line
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # no pending file left
    status, err = _fit(_args(files, run, *args, "resume=last"), capfd)
    assert status == 0, err[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in weights(run).values())


@pytest.mark.slow
def test_disk_full_while_checkpointing(tmp_path, capfd, in_repo, monkeypatch):
    """The second checkpoint write fails with ENOSPC: one line, and the first checkpoint is whole."""
    full_disk(monkeypatch, fails_from=2, match="last.ckpt")
    files, run = write_vlguard(tmp_path / "data"), tmp_path / "run"
    status, err = _fit(_args(files, run, "trainer.max_steps=4"), capfd)
    assert status == 2 and "Traceback" not in err, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert f"cannot write checkpoint {run}/checkpoints/last.ckpt: No space left on device (disk full)" in line
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert not (run / "results.csv").exists()


def test_checkpoint_write_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    from core.errors import UserError

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    full_disk(monkeypatch)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last.ckpt: No space left on device \(disk full\); "
                                        "the last complete checkpoint is kept"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from lightning_modules.methods.alignment import TrainingDiverged

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, path)
    for bad in ({"state_dict": {"w": torch.tensor([1.0, float("nan")])}},
                {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor(
                    [float("inf")])}}}]}):
        with pytest.raises(TrainingDiverged, match=rf"after step 4 .*last one with finite weights is {path} \(step 2\)"):
            io.save_checkpoint({"global_step": 4, **bad}, path)
        assert torch.load(path, weights_only=True)["global_step"] == 2


class _Results:
    test_results = {"unsafe_clean": {"asr": 0.25, "refusal_rate": 0.5, "ir": float("nan"), "accuracy": 1 / 3, "n": 4.0},
                    "safe_clean": {"asr": 0.0, "refusal_rate": 0.1 + 0.2, "ir": 0.0, "accuracy": 0.7, "n": 10.0}}
    generations = [{"id": "r1", "response": "ok", "score": float("inf")}]


def test_results_are_strict_json_and_csv_that_reads_back(tmp_path):
    import pandas as pd

    from lightning_modules.run.training import write_results

    table = write_results(tmp_path, _Results())
    back = pd.read_csv(tmp_path / "results.csv", index_col="eval_set")
    pd.testing.assert_frame_equal(back, table, check_exact=True)

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_constants)
    assert results["unsafe_clean"]["ir"] is None
    (row,) = [json.loads(line, parse_constant=no_constants) for line in (tmp_path / "samples.jsonl").open()]
    assert row["score"] is None


def test_results_write_on_a_full_disk_keeps_the_old_results(tmp_path, monkeypatch):
    from core.errors import UserError
    from lightning_modules.run.training import write_results

    write_results(tmp_path, _Results())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    full_disk(monkeypatch)
    with pytest.raises(UserError, match=r"cannot write results .*results.csv: No space left on device \(disk full\)"):
        write_results(tmp_path, _Results())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_refuses_changed_settings_unless_allowed(tmp_path):
    """The checkpoint's run config against the new one: data / model / base / method changes are
    named in one line; resume_allow_changes=true lets them through; cache locations never count."""
    from omegaconf import OmegaConf

    from core.errors import UserError
    from lightning_modules.config.loading import load_config
    from lightning_modules.run.resume import resolve_checkpoint

    files, run = write_vlguard(tmp_path / "data"), tmp_path / "run"
    old = load_config(REPO / "configs/demo.yaml", vlguard_overrides(files, run) + ["data.max_length=32"])
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "global_step": 3, "hyper_parameters": OmegaConf.to_container(old)}, ckpt)
    new = vlguard_overrides(files, run) + [f"resume={ckpt}", f"paths.cache={tmp_path / 'elsewhere'}"]
    with pytest.raises(UserError, match=r"was trained with other settings: data.max_length changed"):
        resolve_checkpoint(load_config(REPO / "configs/demo.yaml", new), run)
    allowed = load_config(REPO / "configs/demo.yaml", new + ["resume_allow_changes=true"])
    assert resolve_checkpoint(allowed, run) == str(ckpt)
    same = load_config(REPO / "configs/demo.yaml", new + ["data.max_length=32", "data.num_workers=2"])
    assert resolve_checkpoint(same, run) == str(ckpt)
