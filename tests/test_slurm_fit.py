"""`fit` across nodes under Slurm (scripts/slurm/fit_multinode.sbatch): the script parses, the command
its srun runs composes a valid fit config, Lightning takes world size and ranks from the SLURM_*
variables srun sets (SLURMEnvironment), and two ranks started with those variables train together."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from conftest import SMALL
from test_bad_inputs import REPO, cli_env

SCRIPT = REPO / "scripts" / "slurm" / "fit_multinode.sbatch"


def srun_env(rank: int, ntasks: int = 2, port: int = 29511) -> dict[str, str]:
    """What srun sets for task `rank` of `ntasks` on one node (job 4242)."""
    return {"SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks), "SLURM_NNODES": "1",
            "SLURM_JOB_NUM_NODES": "1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
            "SLURM_JOB_NAME": "safety-mirage-fit", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def srun_command(env: dict, *args: str) -> list[str]:
    """The command line the script hands to srun (its FIT_DRY_RUN mode), split as bash would."""
    out = subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **env, "FIT_DRY_RUN": "1"},
                         capture_output=True, text=True, check=True, cwd=REPO)
    return shlex.split(out.stdout)


def test_script_parses_and_its_header_matches_what_it_asks_of_the_trainer():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    header = dict(line[len("#SBATCH --"):].split("=", 1) for line in SCRIPT.read_text().splitlines()
                  if line.startswith("#SBATCH --") and "=" in line)
    assert header["ntasks-per-node"] == header["gpus-per-node"]  # one rank per GPU
    assert header["signal"].startswith("SIGUSR1@") and "requeue" in SCRIPT.read_text()  # Lightning's requeue signal
    assert 'srun --kill-on-bad-exit=1 "${FIT[@]}"' in SCRIPT.read_text()  # a task that dies ends the others
    command = srun_command({"SLURM_JOB_NUM_NODES": header["nodes"], "SLURM_NTASKS_PER_NODE": header["ntasks-per-node"],
                            "SLURM_JOB_NAME": "safety-mirage-fit", "SLURM_JOB_ID": "77"}, "configs/demo.yaml")
    assert command[:3] == ["python", "-m", "lightning_modules.fit"]
    assert f"trainer.num_nodes={header['nodes']}" in command and "resume=auto" in command
    assert "run_dir=runs/safety-mirage-fit-77" in command  # a requeued job keeps its id, hence its run dir


def test_srun_command_composes_a_fit_config(capfd, monkeypatch):
    from lightning_modules.fit import main

    monkeypatch.chdir(REPO)
    command = srun_command({"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4"},
                           "configs/experiment/mirage_sft.yaml", "trainer=fsdp")
    capfd.readouterr()
    try:
        main([*command[3:], "--print-config"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capfd.readouterr()
    assert code == 0, err
    printed = OmegaConf.create(out)
    assert printed.trainer.num_nodes == 2 and printed.trainer.devices == 4 and printed.resume == "auto"
    assert printed.trainer.strategy.name == "fsdp"  # the strategy given after the script's own trainer=ddp wins


def test_lightning_takes_world_size_and_ranks_from_srun(tmp_path, monkeypatch):
    """Task 1 of 2 on one node: our trainer config under the SLURM_* variables srun sets."""
    from lightning_modules.config.loading import load_config
    from lightning_modules.run.assembly import build_trainer

    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    for key, value in srun_env(rank=1).items():
        monkeypatch.setenv(key, value)
    # A Trainer of rank 1 makes this process rank 1 for Lightning's rank-zero helpers: put it back after.
    for helper in (rank_zero_only, fabric_rank_zero):
        monkeypatch.setattr(helper, "rank", getattr(helper, "rank", 0))
    cfg = load_config("configs/demo.yaml", ["trainer=ddp_cpu", "trainer.devices=2", "trainer.num_nodes=1",
                                            f"run_dir={tmp_path}", "trainer.logger=false"])
    trainer = build_trainer(cfg, tmp_path)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.creates_processes_externally
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (2, 1, 1, 0)
    assert (environment.main_address, environment.main_port) == ("127.0.0.1", 29511)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.scale
def test_two_srun_tasks_train_one_run(tmp_path):
    """The script's command, started twice with srun's variables (what srun does on one node with
    --ntasks-per-node=2): one DDP run over gloo, rank 0 writing its results."""
    port, run_dir = free_port(), tmp_path / "run"
    command = srun_command({**srun_env(0, port=port), "TRAINER": "ddp_cpu", "RUN_DIR": str(run_dir)},
                           "configs/demo.yaml", *SMALL, f"paths.cache={tmp_path / 'cache'}", "trainer.max_steps=2")
    command[0] = sys.executable
    procs = [subprocess.Popen(command, cwd=REPO, env={**cli_env(), **srun_env(rank, port=port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1]  # one process group of two
    assert (run_dir / "results.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (Path(REPO) / "runs" / "safety-mirage-fit-4242").exists()
