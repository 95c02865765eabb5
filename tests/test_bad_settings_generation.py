"""Bad settings of generation on several devices (evaluate, the suite, the harvest): each ends in one
line naming the key, the value and what is accepted, before any process is started or file written.
Run through the commands' own entry points (in-process: the checks come before the launch)."""

from __future__ import annotations

import pytest

from lightning_modules.evaluate import main as evaluate_main
from lightning_modules.harvest import main as harvest_main

EVALUATE = ["--config", "configs/evaluate/tiny_smoke.yaml", "evaluate.data_dir=unused", "evaluate.attack_dir=unused",
            "trainer.accelerator=cpu"]
HARVEST = ["--config", "configs/experiment/mirage_npo.yaml", "trainer.accelerator=cpu"]
STRATEGY = ("cannot generate: each rank generates with a whole model, so generation runs under ddp (one process per "
            "device, never spawned); set trainer.strategy=ddp or auto")
DEVICES = "cannot generate: give a number of devices >= 1 (-1 or auto: every device; on the CPU, processes)"
TIMEOUT = "(allowed: a number of seconds > 0)"

CASES = [
    (EVALUATE, ["trainer.devices=0"], f"trainer.devices=0 {DEVICES}"),
    (EVALUATE, ["trainer.devices=-3"], f"trainer.devices=-3 {DEVICES}"),
    (EVALUATE, ["trainer.devices='0'"], f"trainer.devices='0' {DEVICES}"),
    (EVALUATE, ["trainer.devices=abc"], "trainer settings cannot generate (accelerator=cpu, devices='abc', num_nodes=1): "
                                        "`devices` selected with `CPUAccelerator` should be an int > 0"),
    (EVALUATE, ["trainer.devices=[0,1]"], "devices=[0, 1], num_nodes=1): `devices` selected with `CPUAccelerator` "
                                          "should be an int > 0"),
    (EVALUATE, ["trainer.accelerator=tpu"], "trainer settings cannot generate (accelerator=tpu, devices=1, num_nodes=1): "
                                            "Requirement 'torch_xla"),
    (EVALUATE, ["trainer.strategy=ddp_fork", "trainer.devices=2"], f"trainer.strategy=ddp_fork {STRATEGY}"),
    (EVALUATE, ["trainer.strategy=fsdp", "trainer.devices=2"], f"trainer.strategy=fsdp {STRATEGY}"),
    (EVALUATE, ["trainer.strategy=ddp_spawn", "trainer.devices=2"], f"trainer.strategy=ddp_spawn {STRATEGY}"),
    (EVALUATE, ["trainer.strategy=deepspeed_stage_3", "trainer.devices=2"], f"trainer.strategy=deepspeed_stage_3 {STRATEGY}"),
    (EVALUATE, ["trainer.strategy=horovod"], f"trainer.strategy=horovod {STRATEGY}"),
    (EVALUATE, ["trainer.strategy={name: ddp, timeout: -5}"], f"'trainer.strategy.timeout': -5 {TIMEOUT}"),
    (EVALUATE, ["trainer.strategy={name: ddp, timeout: soon}"], f"'trainer.strategy.timeout': 'soon' {TIMEOUT}"),
    (EVALUATE, ["trainer.strategy={name: ddp, heartbeat: 1}"],
     "invalid value for config key 'trainer.strategy.heartbeat': 1 (allowed: a number of seconds >= 3)"),
    (EVALUATE, ["trainer.strategy={name: ddp, bucket_cap_mb: 3}"],
     "trainer.strategy for generation takes name, timeout and heartbeat, got ['bucket_cap_mb', 'name']"),
    (EVALUATE, ["trainer.strategy={timeout: 5}"], "trainer.strategy for generation takes name, timeout and heartbeat, got ['timeout']"),
    (EVALUATE, ["trainer.accelerator=gpu"], "trainer.accelerator=gpu but torch finds no CUDA GPU on this machine"),
    (HARVEST, ["trainer.devices=0"], f"trainer.devices=0 {DEVICES}"),
    (HARVEST, ["trainer.strategy=fsdp", "trainer.devices=2"], f"trainer.strategy=fsdp {STRATEGY}"),
    (HARVEST, ["trainer.strategy={name: ddp, timeout: 0}"], f"'trainer.strategy.timeout': 0 {TIMEOUT}"),
]


@pytest.mark.parametrize("command, overrides, expected", CASES, ids=[" ".join(c[1]) + f" [{i}]" for i, c in enumerate(CASES)])
def test_bad_generation_setting_fails_in_one_line(command, overrides, expected, capsys, tmp_path):
    main = evaluate_main if command is EVALUATE else harvest_main
    with pytest.raises(SystemExit) as exit_:
        main([*command, f"run_dir={tmp_path / 'run'}", f"paths.cache={tmp_path / 'cache'}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing started, nothing written
