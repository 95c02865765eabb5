"""`fit --plan` per GPU: the device count resolved (devices -1 / auto = the visible GPUs, or
trainer.devices=N offline), the strategy and update path modelled, and the model states checked against
DeepSpeed's own estimator for LLaVA-1.5-7B (meta device, its shipped config.json) at 1 and 8 GPUs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from lightning_modules import fit
from lightning_modules.config.loading import load_config
from lightning_modules.run.plan import plan_model, plan_strategy, run_plan, world_size
from models.memory import GiB, ModelShape, estimate_memory

REPO = Path(__file__).resolve().parent.parent

RECIPE = "configs/experiment/vlguard_npo_full.yaml"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def row(plan: str, name: str) -> float:
    return float(re.search(rf"    {re.escape(name)}\s+([\d.]+) GiB", plan).group(1)) * GiB


def deepspeed_counts(model) -> tuple[int, int]:
    """(total, largest layer) parameters as DeepSpeed's model_to_params counts them (without weights)."""
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("stage", [3, 2])
def test_plan_of_npo_full_matches_deepspeeds_estimator(stage, gpus):
    cfg = load_config(RECIPE, [f"trainer=deepspeed_zero{stage}", f"trainer.devices={gpus}"])
    plan = run_plan(cfg)
    assert f"strategy: DeepSpeed ZeRO-{stage} on {gpus} process(es)" in plan
    assert "update path: DeepSpeed bf16/fp16 mode: fp32 master weights" in plan
    total, largest = deepspeed_counts(plan_model(cfg))
    if stage == 3:
        _, expected, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=1,
                                                              cpu_offload=False, cpu_offload_params=False)
    else:
        _, expected = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, num_nodes=1,
                                                            cpu_offload=False)
    ours = row(plan, "model states")
    print(f"ZeRO-{stage} x{gpus}: plan {ours / GiB:.2f} GiB, DeepSpeed {expected / GiB:.2f} GiB")
    assert abs(ours - expected) / expected < 0.25, (ours / GiB, expected / GiB)
    assert row(plan, "activations") > 0 and row(plan, "total") > ours  # activations shown apart, then added


def test_zero_paper_rule_per_trainable_parameter():
    """16 bytes per trainable parameter (2 + 2 + 12) under ZeRO-3 and fp32 FSDP, divided by P; ZeRO-2
    divides the 14 non-weight bytes; DDP divides nothing and adds a gradient bucket."""
    shape = ModelShape(total_params=1000, trainable_params=1000, n_layers=1, hidden=1, vocab=1)
    common = dict(weight_bytes=2, seq_len=1, batch=1, checkpointing=False)
    rule = {name: v for name, v in estimate_memory(shape, path="strategy", strategy="zero3", world=4, **common).rows()}
    assert rule["weights (16-bit)"] + rule["gradients (16-bit)"] + rule["fp32 master weights"] + \
        rule["AdamW moments (fp32)"] == 16 * 1000 / 4
    zero2 = dict(estimate_memory(shape, path="strategy", strategy="zero2", world=4, **common).rows())
    assert zero2["weights (16-bit)"] == 2000 and zero2["gradients (16-bit)"] + zero2["fp32 master weights"] + \
        zero2["AdamW moments (fp32)"] == 14 * 1000 / 4
    fsdp = dict(estimate_memory(shape, path="strategy", strategy="fsdp", world=4, **common).rows())
    assert fsdp["weights (fp32 shards)"] + fsdp["gradients (fp32 shards)"] + fsdp["AdamW moments (fp32)"] == 16 * 250
    ddp = dict(estimate_memory(shape, path="fp32", strategy="ddp", world=4, fused=False, **common).rows())
    assert (ddp["weights"], ddp["16-bit compute copies"], ddp["gradients"], ddp["AdamW moments (fp32)"]) == \
        (4000, 2000, 4000, 8000)
    assert ddp["DDP gradient buckets"] == 4000 and ddp["optimizer-step temporary"] == 4000
    kahan = dict(estimate_memory(shape, path="kahan", strategy="single", **common).rows())
    assert kahan["weights"] + kahan["gradients"] + kahan["AdamW moments"] + kahan["Kahan compensation"] == 10 * 1000
    assert "optimizer-step temporary" not in kahan  # torch-optimi steps one tensor at a time


def test_device_count_is_resolved(monkeypatch):
    assert world_size({"devices": 8}) == 8 and world_size({"devices": "0,1,2"}) == 3
    assert world_size({"devices": -1, "accelerator": "gpu"}) == max(torch.cuda.device_count(), 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert world_size({"devices": -1, "accelerator": "gpu"}) == 4 == world_size({"devices": "auto"})
    assert world_size({"devices": -1, "num_nodes": 2}) == 8 and world_size({"devices": "auto", "accelerator": "cpu"}) == 1
    assert plan_strategy({"strategy": "deepspeed_stage_3_offload"}, 8)[:3] == ("zero3", True, True)
    assert plan_strategy({"strategy": {"name": "fsdp"}}, 8)[0] == "fsdp" and plan_strategy({}, 2)[0] == "ddp"


def test_plan_with_a_gpu_trainer_prints_on_a_machine_without_one(capsys):
    """--plan loads no weights and starts no Trainer: a GPU config plans on this CPU machine."""
    fit.main(["--config", RECIPE, "--plan", "trainer=deepspeed_zero3", "trainer.devices=8"])
    out = capsys.readouterr().out
    assert "strategy: DeepSpeed ZeRO-3 on 8 process(es)" in out and "model states" in out
    assert "recipe's strategy for 8 GPU(s) (strategy_by_gpus[8]): trainer=deepspeed_zero3" in out


@pytest.mark.slow  # 14 plans of LLaVA-1.5-7B on the meta device (~30 s)
@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs" / "experiment").glob("vlguard_*.yaml")
                                          if "strategy_by_gpus" in p.read_text()))
def test_every_recipe_strategy_entry_composes_and_plans(recipe):
    """Each `strategy_by_gpus` entry is a command line that works: it composes with its recipe and the
    plan for it names that strategy and a per-GPU total an 80 GiB card holds with 10% headroom."""
    from omegaconf import OmegaConf

    path = REPO / "configs" / "experiment" / recipe
    for gpus, entry in OmegaConf.load(path).strategy_by_gpus.items():
        text = run_plan(load_config(path, str(entry).split()))
        assert f"on {gpus} process(es)" in text
        total = float(re.search(r"^\s*total\s+([\d.]+) GiB", text, re.M).group(1))
        assert 0 < total < 0.9 * 80, (recipe, gpus, total)  # GiB: an 80 GiB card with 10% headroom
