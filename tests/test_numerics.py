"""bf16 weights updated against fp32 values: a toy LLaVA built in bf16 and fine-tuned in full through the
fit CLI (the real module, Trainer and export) moves its weight matrices like the fp32 run does, on the
default path (fp32 masters under bf16 autocast) and with Kahan summation; plain AdamW on bf16 weights,
asked for by name, loses the updates. Learning rate 5e-6: one AdamW step (~lr) is far below half the
bf16 spacing of a weight ~N(0, 0.02) (~6e-5), the sum of the steps is many spacings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_modules import fit
from models.precision import optimizer_spec, upcast_trainable
from vlguard_fixture import write_vlguard

STEPS = 120
BF16 = ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"]


def fit_weights(files: dict, run_dir: Path, *extra: str) -> dict[str, torch.Tensor]:
    fit.main(["--config", "configs/demo.yaml", "data=vlguard", "model=tiny-llava", "method=sft",
              *[f"{k}={v}" for k, v in files.items()], f"data.image_dir={Path(files['data.train_file']).parent}",
              "data.batch_size=1", "data.max_length=256", f"trainer.max_steps={STEPS}",
              "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "trainer.logger=false", "eval.val_at_start=false",
              "eval.test_at_end=false", "checkpoint.save_last=false", "optim.lr=5e-6", "optim.warmup_ratio=0",
              "optim.scheduler=constant", f"run_dir={run_dir}", f"paths.cache={run_dir.parent / 'cache'}", *extra])
    return load_file(str(run_dir / "model" / "model.safetensors"))


def slope(init: dict, reference: dict, run: dict) -> float:
    """Least-squares slope (through 0) of the run's weight changes on the fp32 run's, over the
    trained weight matrices; the run's start is the bf16 rounding of the common fp32 start."""
    xs, ys = [], []
    for key, w0 in init.items():
        if w0.dim() == 2 and "vision_tower" not in key:  # the frozen tower moves in neither run
            xs.append((reference[key].double() - w0.double()).flatten())
            ys.append((run[key].double() - w0.to(torch.bfloat16).double()).flatten())
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.abs().max() > 8 * 1.2e-4 * 0.5  # the fp32 run moved by many half-spacings in total
    return float((x * y).sum() / (x * x).sum())


@pytest.mark.slow
def test_bf16_full_finetuning_moves_weights_like_fp32(tmp_path, one_thread):
    files = write_vlguard(tmp_path / "data", n_train=8, n_val=2, n_test=2)
    init = fit_weights(files, tmp_path / "init", "optim.lr=0", "trainer.max_steps=1")  # the seed's start
    reference = fit_weights(files, tmp_path / "fp32")
    default = fit_weights(files, tmp_path / "bf16", *BF16)
    assert {str(t.dtype) for t in default.values()} == {"torch.float32", "torch.bfloat16"}  # trained fp32, frozen bf16
    assert all(default[k].dtype == torch.bfloat16 for k in default if "vision_tower" in k)
    # trainer.precision left at 32: the module autocasts its steps itself (models.precision.compute_context)
    own_autocast = fit_weights(files, tmp_path / "bf16_p32", "model.dtype=bfloat16")
    kahan = fit_weights(files, tmp_path / "kahan", *BF16, "optim.master_weights=kahan")
    plain = fit_weights(files, tmp_path / "none", *BF16, "optim.master_weights=none")
    slopes = {name: slope(init, reference, run) for name, run in
              (("fp32", default), ("fp32_precision_32", own_autocast), ("kahan", kahan), ("none", plain))}
    print("weight-change slopes on the fp32 run's:", slopes)
    assert all(0.8 <= slopes[k] <= 1.2 for k in ("fp32", "fp32_precision_32", "kahan")), slopes
    assert slopes["none"] < 0.2, slopes


def test_lora_modules_to_save_copy_is_upcast():
    """peft's `modules_to_save` copy keeps the base dtype; the fp32 path upcasts it with the adapters."""
    from omegaconf import OmegaConf

    from lightning_modules.config.schema import ModelSettings
    from models.backbone import build_backbone

    cfg = OmegaConf.merge(OmegaConf.structured(ModelSettings), OmegaConf.load("configs/model/tiny-llava.yaml"),
                          {"dtype": "bfloat16", "finetune": "lora", "lora": {"modules_to_save": ["multi_modal_projector"]}})
    model, _ = build_backbone(cfg, ["a small corpus"])
    copies = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert copies and all(p.dtype == torch.bfloat16 for p in copies)
    upcast_trainable(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)


def test_optimizer_of_each_update_path():
    import optimi
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from omegaconf import OmegaConf

    optim = OmegaConf.create({"lr": 1e-5, "weight_decay": 0.0, "betas": [0.9, 0.999]})
    assert optimizer_spec(optim, "fp32")[0] is torch.optim.AdamW
    assert optimizer_spec(optim, "fp32", fused=True)[1]["fused"] is True
    cls, kwargs = optimizer_spec(optim, "kahan")
    assert cls is optimi.AdamW and kwargs["kahan_sum"] and kwargs["eps"] == 1e-8
    assert optimizer_spec(optim, "strategy", ds_offload=True)[0] is DeepSpeedCPUAdam  # built only on a GPU run


@pytest.mark.parametrize("overrides, upcast", [
    ([], True), (["trainer=deepspeed_zero3"], False), (["trainer=deepspeed_zero2"], False), (["trainer=fsdp"], False),
    (["optim.master_weights=kahan"], False), (["optim.master_weights=none"], False)])
def test_upcast_only_where_no_strategy_keeps_masters(overrides, upcast):
    """DeepSpeed's bf16 mode and FSDP keep fp32 masters themselves: nothing is upcast for them."""
    from lightning_modules.config.loading import load_config
    from models.backbone import build_backbone
    from models.precision import apply_master_weights, strategy_keeps_masters

    cfg = load_config("configs/demo.yaml", ["model=tiny-llava", "model.dtype=bfloat16", "trainer.precision=bf16-mixed",
                                            *overrides])
    model, _ = build_backbone(cfg.model, ["a small corpus"])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # model.dtype applies to the toy too
    path = apply_master_weights(model, cfg)
    assert strategy_keeps_masters(cfg) == (path.name == "strategy")
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trained == ({torch.float32} if upcast else {torch.bfloat16})
