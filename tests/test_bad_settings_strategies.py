"""Strategy settings, and strategy x setting combinations that cannot work, end in one line before a
run directory is made or a model loaded (`lightning_modules.run.training.run` on the loaded config)."""

from __future__ import annotations

import pytest

from core.errors import UserError
from lightning_modules.config.loading import load_config
from lightning_modules.run.training import run
from test_bad_inputs import REPO

FSDP = "trainer.strategy={name: fsdp}"
CASES = [
    (["trainer.strategy={name: fsdp, sharding_strategy: HYBRID_SHARD}"],
     "invalid value for config key 'trainer.strategy.sharding_strategy': 'HYBRID_SHARD' (allowed: FULL_SHARD, "
     "SHARD_GRAD_OP)"),
    (["trainer.strategy={name: fsdp, state_dict_type: local}"],
     "invalid value for config key 'trainer.strategy.state_dict_type': 'local' (allowed: full, sharded)"),
    (["trainer.strategy={name: fsdp, activation_checkpointing: sometimes}"],
     "invalid value for config key 'trainer.strategy.activation_checkpointing': 'sometimes' (allowed: True, False)"),
    (["trainer.strategy={name: fsdp, cpu_offload: true}"],
     "trainer.strategy.cpu_offload=true is not supported for fsdp"),
    (["trainer.strategy={name: fsdp, limit_all_gathers: true}"],
     "unknown config key 'trainer.strategy.limit_all_gathers' (for fsdp); known: activation_checkpointing, "
     "cpu_offload, heartbeat, sharding_strategy, state_dict_type, timeout"),
    (["trainer.strategy={name: fsdp, timeout: -5}"],
     "invalid value for config key 'trainer.strategy.timeout': -5 (allowed: a number of seconds > 0)"),
    (["trainer.strategy={name: ddp, heartbeat: 0.5}"],
     "invalid value for config key 'trainer.strategy.heartbeat': 0.5 (allowed: a number of seconds >= 3)"),
    (["trainer.strategy=fsdp_cpu_offload"],
     "trainer.strategy 'fsdp_cpu_offload' (Lightning's FSDP1) is not supported; allowed: fsdp or {name: fsdp, ...}"),
    ([FSDP, "trainer.precision=bf16-true"],
     "trainer.precision=bf16-true is not supported with trainer.strategy fsdp (allowed: 32-true, bf16-mixed)"),
    ([FSDP, "trainer.precision=16-mixed"],
     "trainer.precision=16-mixed is not supported with trainer.strategy fsdp (allowed: 32-true, bf16-mixed)"),
    ([FSDP, "eval.probes=true"],
     "eval.probes=true cannot run with trainer.strategy fsdp: the probes run forwards on rank 0 alone"),
    (["trainer.strategy=deepspeed_stage_3", "eval.probes=true"],
     "eval.probes=true cannot run with trainer.strategy deepspeed_stage_3: the probes run forwards on rank 0 alone"),
    (["trainer.strategy={name: deepspeed, stage: 3}", "eval.probes=true"],
     "eval.probes=true cannot run with trainer.strategy deepspeed: the probes run forwards on rank 0 alone"),
]


@pytest.mark.parametrize("extra, expected", CASES, ids=[c[1][:48] for c in CASES])
def test_bad_strategy_settings_end_in_one_line_before_anything_is_written(tmp_path, extra, expected):
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"run_dir={tmp_path / 'run'}", "trainer.accelerator=cpu",
                                                       *extra])
    with pytest.raises(UserError) as err:
        run(cfg)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


NO_COMPILER = "C++ compiler 'no-such-c++' found): install them (its first run builds it) or remove the optimizer offload"


@pytest.mark.parametrize("extra, key", [
    (["trainer=deepspeed_zero2_cpu", "trainer.strategy.config.zero_optimization.offload_optimizer.device=cpu"],
     "trainer.strategy.config.zero_optimization.offload_optimizer"),
    (["trainer.strategy=deepspeed_stage_3_offload"], "trainer.strategy=deepspeed_stage_3_offload"),
    (["trainer.strategy={name: deepspeed, offload_optimizer: true}"], "trainer.strategy.offload_optimizer=true"),
])
def test_an_offloaded_optimizer_that_cannot_be_built_ends_in_one_line(tmp_path, monkeypatch, extra, key):
    """DeepSpeed's CPU Adam is a C++ op compiled by the first run: without a compiler, one line before anything."""
    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"cpu_adam": False})
    monkeypatch.setenv("CXX", "no-such-c++")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"run_dir={tmp_path / 'run'}", "trainer.accelerator=cpu",
                                                       *extra])
    with pytest.raises(UserError) as err:
        run(cfg)
    assert str(err.value) == f"{key} runs DeepSpeed's CPU Adam, a C++ op neither installed nor buildable here (no " \
                             + NO_COMPILER and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
