"""Every method under FSDP (FSDP2) and DDP on two CPU processes (gloo): validation at step 0 inside
fit -> fit -> test -> export (model/ loads with from_pretrained) and, under FSDP, resume=last with more
steps. FSDP trains like DDP (the same losses at every step: fp32 shards, gradients averaged the same).

FSDP on CPU: Lightning's ModelParallelStrategy (FSDP2) runs on CPU processes as it is, so nothing is
patched here. All runs share one pair of processes (tests/strategy_runs.py, started as torchrun starts
ranks): a pair per run would spend more time importing than training.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_bad_inputs import REPO, cli_env
from vlguard_fixture import tiny_overrides, vlguard_overrides, write_vlguard

METHODS = {  # name -> overrides; every unlearning reference path: cache (+ retain term), snapshot, adapter
    "sft": ["method=sft"],
    "ga": ["method=ga"],
    "graddiff": ["method=graddiff"],
    "npo": ["method=npo", "method.retain_npo_alpha=0.5"],  # reference=auto: the cached reference NLL
    "simnpo": ["method=simnpo"],
    "rmu": ["method=rmu"],  # full fine-tuning: the frozen module copies (snapshot), truncated forwards
    "npo_lora": ["method=npo", "model.finetune=lora", "method.reference=adapter", "export.merge_lora=true"],
}
STRATEGIES = {"fsdp": "trainer.strategy={name: fsdp, timeout: 120}", "ddp": "trainer.strategy={name: ddp, timeout: 120}"}


# GA under FSDP also keeps gathered weights from forward to backward and recomputes blocks in backward
# (the same numbers: compared with DDP like the others).
GA_FSDP = "trainer.strategy={name: fsdp, sharding_strategy: SHARD_GRAD_OP, activation_checkpointing: true, timeout: 120}"


def overrides(files: dict, run_dir: Path, method: list[str], strategy: str, *extra: str) -> list[str]:
    """One run's overrides; `strategy`: a key of STRATEGIES, or an override of its own (trainer=...)."""
    chosen = GA_FSDP if (strategy, method) == ("fsdp", METHODS["ga"]) else STRATEGIES.get(strategy, strategy)
    return [*vlguard_overrides(files, run_dir), *method, "trainer.accelerator=cpu", "trainer.devices=2",
            chosen, "trainer.max_steps=2", "checkpoint.every_n_train_steps=1", "data.batch_size=2",
            "data.max_eval_samples=2", "eval.max_new_tokens=2", "eval.val_at_start=true", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(runs: list[list[str]], tmp_path: Path, timeout: float = 900) -> float:
    """The runs in one pair of processes (rank 0 and 1); their wall time."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps({"runs": runs}))
    port, start = free_port(), time.monotonic()
    procs = []
    for rank in (0, 1):
        env = dict(cli_env(), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "strategy_runs.py"), str(spec)],
                                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-5000:] + (tmp_path / "rank1.log").read_text()[-3000:]
    return time.monotonic() - start


def scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag.startswith(prefix)}


def loads(model_dir: Path, lora: bool) -> None:
    if lora:
        from peft import AutoPeftModel

        model = AutoPeftModel.from_pretrained(model_dir)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def saved_step(run_dir: Path) -> int:
    from lightning_modules.run.checkpointing import saved_step

    return saved_step(run_dir / "checkpoints" / "last.ckpt")  # a file, or a sharded checkpoint's directory


@pytest.mark.slow
@pytest.mark.scale  # every method on two processes: minutes, in make test-scale
def test_every_method_under_fsdp_and_ddp_on_two_processes(tmp_path):
    files = write_vlguard(tmp_path / "data", n_train=12, n_val=2, n_test=2)
    fresh = {(s, m): tmp_path / f"{s}_{m}" for s in STRATEGIES for m in METHODS}
    runs = [overrides(files, d, METHODS[m], s) for (s, m), d in fresh.items()]
    # resume=last with more steps: each FSDP run continues from its step-2 checkpoint and finishes again
    runs += [overrides(files, fresh["fsdp", m], METHODS[m], "fsdp", "resume=last", "trainer.max_steps=3",
                       "eval.test_at_end=false", "eval.val_at_start=false") for m in METHODS]
    sharded = tmp_path / "fsdp_sharded_rmu"  # state_dict_type=sharded: a checkpoint directory per save
    sharded_rmu = [*METHODS["rmu"], "trainer.strategy.state_dict_type=sharded"]
    runs += [overrides(files, sharded, sharded_rmu, "fsdp"),
             overrides(files, sharded, sharded_rmu, "fsdp", "resume=last", "trainer.max_steps=3")]
    bf16 = tmp_path / "fsdp_bf16_rmu"  # bf16 compute (FSDP2's policy under autocast), fp32 shards and frozen copies
    runs.append(overrides(files, bf16, METHODS["rmu"], "fsdp", "trainer.precision=bf16-mixed"))
    wall = run_pair(runs, tmp_path)
    print(f"{len(runs)} runs on 2 processes: {wall:.0f} s")

    for (strategy, method), run_dir in fresh.items():
        where = f"{strategy} {method}"
        results = json.loads(((run_dir / "finished-step2") if strategy == "fsdp" else run_dir).joinpath(
            "results.json").read_text())
        assert {r["n"] for r in results.values()} == {2}, where  # every eval set, every query once
        val = scalars(run_dir, "val/")
        assert val and all(points[0][0] == 0 for points in val.values()), where  # validated at step 0, in fit
        assert all(len(points) == 1 for points in val.values()), where  # once: not again on resume
        loads(run_dir / "model", lora=False)  # under LoRA: merged (on rank 0, from the gathered weights under FSDP)
        if method.endswith("lora"):
            loads(run_dir / "adapter", lora=True)  # on the base saved beside it (built from config)
    for method in METHODS:  # FSDP trains as DDP does: the same loss at each step
        fsdp, ddp = scalars(fresh["fsdp", method], "train/loss"), scalars(fresh["ddp", method], "train/loss")
        f, d = dict(fsdp["train/loss"]), dict(ddp["train/loss"])
        assert set(d) == {0, 1} and set(f) == {0, 1, 2}, method  # the resumed FSDP run took step 3 (index 2)
        for step in d:
            assert f[step] == pytest.approx(d[step], rel=1e-4, abs=1e-6), (method, step)
        assert saved_step(fresh["fsdp", method]) == 3 and (fresh["fsdp", method] / "model").is_dir(), method
    assert (sharded / "checkpoints" / "last.ckpt").is_dir()  # torch.distributed.checkpoint directory
    assert saved_step(sharded) == 3 and (sharded / "finished-step2" / "results.json").is_file()
    loads(sharded / "model", lora=False)
    losses = [v for _, v in scalars(bf16, "train/loss")["train/loss"]]
    assert len(losses) == 2 and losses[0] == pytest.approx(dict(scalars(fresh["ddp", "rmu"], "train/loss")[
        "train/loss"])[0], rel=0.05)  # bf16 compute: close to the fp32 run, not equal
    loads(bf16 / "model", lora=False)


def test_the_copy_rank_0_merges_under_sharding_merges_to_the_live_models_weights():
    """export.merge_lora under FSDP / ZeRO-3: a CPU copy made of the gathered state (built on meta,
    tensors assigned) merges to exactly what merging the model itself gives."""
    import copy

    from lightning_modules.config.loading import load_config
    from lightning_modules.run.export import unsharded_peft_copy
    from models.backbone import build_backbone

    small = [o for o in tiny_overrides(Path("/nonexistent/run")) if o.startswith("model.tiny.")]
    cfg = load_config(REPO / "configs" / "demo.yaml", ["paths.cache=/nonexistent", "model.finetune=lora", *small])
    torch.manual_seed(0)
    model, _ = build_backbone(cfg.model, ["a b c d e", "f g h"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # a trained adapter (lora_B starts at zero)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    merged = unsharded_peft_copy(model, gathered).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key
    assert not any(b.is_meta for b in unsharded_peft_copy(model, gathered).buffers())
