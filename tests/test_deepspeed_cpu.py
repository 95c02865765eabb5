"""Every method under DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo; trainer=deepspeed_zero2_cpu,
deepspeed_zero3_cpu: the engine and ZeRO code of the GPU configs): validation at step 0 inside fit -> fit ->
test -> export (model/ loads with from_pretrained, finite) -> resume=last with one more step. Each trains as
DDP does: at 32-true both are fp32 with gradients averaged over the same two ranks, so the loss at every step
is DDP's (measured equal to the last bit; asserted to rel 1e-5). bf16-mixed (DeepSpeed's bf16 mode) runs too,
close to fp32. A pickle planted in a real checkpoint directory is refused in one line and never runs.

All runs share one pair of processes (tests/strategy_runs.py), the DDP references (training only) included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_bad_checkpoints import MARKER, Planted
from test_bad_inputs import REPO, invoke
from test_strategies import METHODS, loads, overrides, run_pair, saved_step, scalars
from vlguard_fixture import write_vlguard

STAGES = {"zero2": "trainer=deepspeed_zero2_cpu", "zero3": "trainer=deepspeed_zero3_cpu"}
TIMEOUT = "trainer.strategy.timeout=120"  # a rank waits 2 min in a collective for a dead peer
TRAIN_ONLY = ("eval.val_at_start=false", "eval.test_at_end=false")
REL = 1e-5  # DeepSpeed's loss against DDP's at each step (fp32 both)
def losses(run_dir: Path) -> dict[int, float]:
    return dict(scalars(run_dir, "train/loss")["train/loss"])


@pytest.mark.slow
@pytest.mark.scale
def test_every_method_under_zero2_and_zero3_on_two_cpu_processes(tmp_path, capfd, monkeypatch):
    files = write_vlguard(tmp_path / "data", n_train=12, n_val=2, n_test=2)
    ddp = {m: tmp_path / f"ddp_{m}" for m in METHODS}
    fresh = {(s, m): tmp_path / f"{s}_{m}" for s in STAGES for m in METHODS}
    bf16 = tmp_path / "zero3_bf16_npo"
    runs = [overrides(files, d, METHODS[m], "ddp", *TRAIN_ONLY) for m, d in ddp.items()]
    runs += [overrides(files, d, METHODS[m], STAGES[s], TIMEOUT) for (s, m), d in fresh.items()]
    # resume=last with more steps: each run continues from its step-2 checkpoint directory and finishes again
    runs += [overrides(files, d, METHODS[m], STAGES[s], TIMEOUT, "resume=last", "trainer.max_steps=3", *TRAIN_ONLY)
             for (s, m), d in fresh.items()]
    runs.append(overrides(files, bf16, METHODS["npo"], STAGES["zero3"], TIMEOUT, "trainer.precision=bf16-mixed",
                          *TRAIN_ONLY))
    wall = run_pair(runs, tmp_path)
    print(f"{len(runs)} runs on 2 processes: {wall:.0f} s")

    for (stage, method), run_dir in fresh.items():
        where = f"{stage} {method}"
        results = json.loads((run_dir / "finished-step2" / "results.json").read_text())
        assert {r["n"] for r in results.values()} == {2}, where  # every eval set, every query once
        val = scalars(run_dir, "val/")
        assert val and all(len(points) == 1 and points[0][0] == 0 for points in val.values()), where  # not on resume
        loads(run_dir / "finished-step2" / "model", lora=False)  # after the test, before the resume
        loads(run_dir / "model", lora=False)  # under LoRA: merged on rank 0 (from the gathered weights under ZeRO-3)
        if method.endswith("lora"):
            loads(run_dir / "adapter", lora=True)
        last = run_dir / "checkpoints" / "last.ckpt"
        assert saved_step(run_dir) == 3 and (last / "latest").is_file(), where  # DeepSpeed's directory
        # ZeRO-3 partitions the weights: each rank saves its own model-states shard
        shards = sorted(p.name for p in (last / "checkpoint").glob("*model_states.pt"))
        assert len(shards) == (2 if stage == "zero3" else 1), (where, shards)
        ours, reference = losses(run_dir), losses(ddp[method])
        assert set(reference) == {0, 1} and set(ours) == {0, 1, 2}, where  # the resumed run took step 3 (index 2)
        for step in reference:
            assert ours[step] == pytest.approx(reference[step], rel=REL, abs=1e-7), (where, step)
    for method in METHODS:  # resumed from equal states, both stages take the same third step
        assert losses(fresh["zero2", method])[2] == pytest.approx(losses(fresh["zero3", method])[2], rel=REL), method
    bf16_losses = losses(bf16)
    assert set(bf16_losses) == {0, 1} and bf16_losses[0] == pytest.approx(losses(ddp["npo"])[0], rel=0.01)
    loads(bf16 / "model", lora=False)

    # A real checkpoint directory with one file swapped for a pickle that would run code: refused in one line.
    monkeypatch.delenv("SAFETY_MIRAGE_RUN_DIR", raising=False)
    monkeypatch.chdir(REPO)
    from lightning_modules.fit import main

    for stage, method, planted in (("zero2", "sft", "mp_rank_00_model_states.pt"),
                                   ("zero3", "rmu", "zero_pp_rank_1_mp_rank_00_optim_states.pt")):
        run_dir = fresh[stage, method]
        last = run_dir / "checkpoints" / "last.ckpt"
        marker = tmp_path / f"{MARKER}-{stage}"
        (last / "checkpoint" / planted).unlink()  # a real file of the run, replaced
        torch.save({"module": {}, "buffer_names": Planted(marker)}, last / "checkpoint" / planted)
        args = ["--config", "configs/demo.yaml",
                *overrides(files, run_dir, METHODS[method], STAGES[stage], TIMEOUT, "resume=last", "trainer.max_steps=4")]
        status, stderr = invoke(main, args, capfd)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert errors[0].startswith(f"error: resume checkpoint {last}: {planted} is refused, it is not plain "
                                    "checkpoint data and loading it could run code"), errors[0]
        assert not marker.exists()
