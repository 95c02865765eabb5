"""Numerics and DeepSpeed settings that would update a 16-bit weight with a plain optimizer, or cannot
work, are refused when the config is loaded: one line naming the setting (models/precision.py)."""

from __future__ import annotations

import pytest

from core.errors import UserError
from lightning_modules.config.loading import load_config

DEMO = "configs/demo.yaml"
RECIPE = "configs/experiment/vlguard_npo_full.yaml"  # LLaVA-1.5-7B in bf16, trainer/gpu (bf16-mixed)

CASES = [
    (DEMO, ["trainer.precision=bf16-true"], "trainer.precision=bf16-true casts every weight to 16 bits"),
    (DEMO, ["trainer.precision=16-true"], "trainer.precision=16-true casts every weight to 16 bits"),
    (DEMO, ["model.dtype=float16"], "model.dtype=float16 with fp32 trainable weights (optim.master_weights=fp32) "
                                    "needs trainer.precision=16-mixed (fp16 autocast with loss scaling), not 32-true"),
    (DEMO, ["model.dtype=float16", "trainer.precision=64-true"], "needs trainer.precision=16-mixed"),
    (RECIPE, ["model.dtype=float16", "trainer.precision=32"], "not 32"),
    (RECIPE, ["trainer.precision=bf16-true"], "trainer.precision=bf16-true casts every weight"),
    (DEMO, ["optim.master_weights=kahan"], "optim.master_weights=kahan is for 16-bit weights, but model.dtype=float32"),
    (DEMO, ["optim.master_weights=bf16"], "optim.master_weights"),
    (RECIPE, ["trainer=deepspeed_zero3", "optim.master_weights=kahan"],
     "optim.master_weights=kahan with trainer.strategy=deepspeed: DeepSpeed keeps fp32 master weights itself"),
    (RECIPE, ["trainer=deepspeed_zero2", "optim.master_weights=none"], "DeepSpeed keeps fp32 master weights"),
    (RECIPE, ["trainer=fsdp", "optim.master_weights=kahan"], "FSDP keeps fp32 master weights itself"),
    (RECIPE, ["trainer.strategy=deepspeed_stage_3", "trainer.precision=32-true"],
     "DeepSpeed would run its fp32 optimizer on 16-bit weights; set trainer.precision=bf16-mixed"),
]


@pytest.mark.parametrize("config, overrides, message", CASES, ids=[" ".join(o) for _, o, _ in CASES])
def test_refused_in_one_line(config, overrides, message):
    with pytest.raises(UserError) as caught:
        load_config(config, ["data.root=/nowhere", *overrides] if config == RECIPE else overrides)
    text = str(caught.value)
    assert message in text and "\n" not in text, text


@pytest.mark.parametrize("config, overrides", [
    (DEMO, ["trainer.precision=bf16-true", "optim.master_weights=kahan"]),  # asked for: Kahan on bf16 weights
    (DEMO, ["trainer.precision=bf16-true", "optim.master_weights=none"]),  # asked for by name
    (DEMO, ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"]),  # fp32 masters under autocast
    (DEMO, ["model.dtype=bfloat16"]),  # precision 32: the module autocasts itself (compute_context)
    (RECIPE, ["optim.master_weights=kahan"]),
    (RECIPE, ["trainer=deepspeed_zero3"]),
])
def test_accepted(config, overrides):
    load_config(config, ["data.root=/nowhere", *overrides] if config == RECIPE else overrides)
