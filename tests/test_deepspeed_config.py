"""DeepSpeed without a GPU: the shipped configs compose into the official zero2/zero3/zero3_offload values,
"auto" resolved as the official runs' HF Trainer did; Lightning's own code path reads the batch size off
our resumable loader's batch sampler; an offloaded optimizer gets DeepSpeed's CPU Adam. Nothing here
runs DeepSpeed: the objects are built and read (tests/test_deepspeed_cpu.py runs it on CPU processes)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.strategies.deepspeed import _format_precision_config
from lightning.pytorch.strategies import DeepSpeedStrategy

from core.errors import UserError
from datamodules.samplers import ResumableDataLoader
from lightning_modules.config.loading import load_config
from lightning_modules.run.deepspeed_config import resolve_config
from lightning_modules.run.plan import plan_model
from lightning_modules.run.strategies import build_strategy

RECIPE = "configs/experiment/vlguard_npo_full.yaml"


def strategy_for(trainer_group: str, *overrides: str):
    cfg = load_config(RECIPE, [f"trainer={trainer_group}", "data.root=/nowhere", *overrides])
    model = plan_model(cfg)  # meta device: LLaVA-1.5-7B's shapes
    return build_strategy(dict(cfg.trainer.strategy), model, precision=cfg.trainer.precision), cfg


def test_zero3_is_the_official_config():
    strategy, _ = strategy_for("deepspeed_zero3")
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    config = strategy.config
    zero = config["zero_optimization"]
    assert zero == {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 10 ** 9,
                    "reduce_bucket_size": 4096 ** 2, "stage3_prefetch_bucket_size": int(0.9 * 4096 ** 2),
                    "stage3_param_persistence_threshold": 40960, "stage3_max_live_parameters": 10 ** 9,
                    "stage3_max_reuse_distance": 10 ** 9, "stage3_gather_16bit_weights_on_model_save": True}
    assert config["bf16"] == {"enabled": True} and config["fp16"]["enabled"] is False
    # Lightning fills these (and refuses gradient_accumulation_steps in the config); no clipping key: none
    assert not {"gradient_clipping", "gradient_accumulation_steps", "train_batch_size",
                "train_micro_batch_size_per_gpu", "optimizer", "scheduler"} & set(config)
    before = json.dumps(config, sort_keys=True)
    _format_precision_config(config, "bf16-mixed", 0, 1000, 1, 16, 2)  # what Lightning adds at setup
    assert json.dumps(config, sort_keys=True) == before  # nothing: our config already says bf16


def test_zero2_and_offload_variants():
    zero2, _ = strategy_for("deepspeed_zero2")
    assert zero2.config["zero_optimization"]["stage"] == 2 and not zero2.zero_stage_3
    assert zero2.config["zero_optimization"]["reduce_bucket_size"] == 4096 ** 2
    offload, _ = strategy_for("deepspeed_zero3_offload")
    zero = offload.config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True} == zero["offload_param"]
    assert "gradient_clipping" not in offload.config and offload.config["steps_per_print"] == 100000
    fp16, _ = strategy_for("deepspeed_zero2_offload", "trainer.precision=16-mixed")
    assert fp16.config["fp16"]["enabled"] is True and fp16.config["bf16"]["enabled"] is False


@pytest.mark.parametrize("group, cpu_adam", [("deepspeed_zero3", False), ("deepspeed_zero3_offload", True),
                                             ("deepspeed_zero2_offload", True)])
def test_offloaded_optimizer_is_deepspeeds_cpu_adam(group, cpu_adam):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from lightning_modules.methods.npo import NPOModule

    strategy, cfg = strategy_for(group)
    module = NPOModule.__new__(NPOModule)  # only the optimizer choice is asked: no model is loaded
    L.LightningModule.__init__(module)
    module.optim_cfg = cfg.optim
    module._trainer = SimpleNamespace(strategy=strategy)
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    chosen, kwargs = module.optimizer_spec(params)
    assert (chosen is DeepSpeedCPUAdam) == cpu_adam and chosen is not None
    assert chosen is torch.optim.AdamW or cpu_adam
    assert kwargs["lr"] == 5e-7 and "fused" not in kwargs  # never torch's fused step inside DeepSpeed


def test_lightning_reads_the_batch_size_off_our_batch_sampler():
    """DeepSpeedStrategy._auto_select_batch_size reads train_dataloader.batch_sampler.batch_size."""
    loader = ResumableDataLoader(list(range(10)), batch_size=3, sampler=torch.utils.data.SequentialSampler(range(10)))
    assert loader.batch_sampler.batch_size == 3 and loader.batch_sampler.drop_last is False
    trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = L.LightningModule()
    module._trainer = trainer
    trainer._data_connector.attach_data(module, train_dataloaders=loader)
    strategy = DeepSpeedStrategy(config=resolve_config({"zero_optimization": {"stage": 2}}, "bf16-mixed", 64))
    strategy._lightning_module = module
    strategy._format_batch_size_and_grad_accum_config()  # Lightning's own setup code
    assert strategy.config["train_micro_batch_size_per_gpu"] == 3
    assert strategy.config["gradient_accumulation_steps"] == 4 and strategy.config["gradient_clipping"] == 0.0


@pytest.mark.parametrize("config, precision, message", [
    ({"optimizer": {"type": "AdamW"}}, "bf16-mixed", "trainer.strategy.config.optimizer"),
    ({"gradient_accumulation_steps": 4}, "bf16-mixed", "trainer.accumulate_grad_batches"),
    ({"bf16": {"enabled": True}}, "16-mixed", "contradicts trainer.precision=16-mixed"),
    ({"zero_optimization": {"stage": "auto"}}, "bf16-mixed", "cannot resolve 'auto' for zero_optimization.stage"),
    ("/nowhere/ds.json", "bf16-mixed", "DeepSpeed config file not found"),
])
def test_bad_deepspeed_configs(config, precision, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        resolve_config(config, precision, 64)


def test_a_registered_deepspeed_name_is_our_strategy():
    """trainer.strategy=deepspeed_stage_3 (Lightning's registered names) gets atomic checkpoint directories and
    CPU processes as the mapping form does, with the arguments Lightning registers for the name."""
    from lightning_modules.run.checkpointing import AtomicDeepSpeedStrategy

    stage3 = build_strategy("deepspeed_stage_3_offload", None, precision="bf16-mixed")
    assert isinstance(stage3, AtomicDeepSpeedStrategy) and stage3.zero_stage_3
    assert stage3.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert build_strategy("ddp") == "ddp" and build_strategy("deepspeed_nonsense") == "deepspeed_nonsense"  # Lightning's
