"""compare's Slurm launcher settings: each bad one ends in one line naming the key (and what it
accepts), before compare writes anything or submits a job. Also the sbatch file the settings make."""

from __future__ import annotations

import os
import sys

import pytest

from test_bad_inputs import REPO, invoke

BASE = ["compare.methods=[sft]", "compare.seeds=[0]", "compare.world_seeds=[0]", "compare.launcher=slurm"]
CASES = [  # (id, overrides, expected text of the one line)
    ("unknown key", ["compare.slurm.partion=gpu"],
     "unknown config key 'compare.slurm.partion'; known: account, additional, array_parallelism, cluster"),
    ("time with a unit", ["compare.slurm.time=2h"],
     "'compare.slurm.time': '2h' (allowed: minutes (e.g. 120), HH:MM:SS or D-HH:MM:SS"),
    ("time zero", ["compare.slurm.time=0"], "'compare.slurm.time': '0' (allowed: minutes"),
    ("time 75 minutes past the hour", ["compare.slurm.time='01:75:00'"], "'compare.slurm.time': '01:75:00'"),
    ("gpus below zero", ["compare.slurm.gpus_per_node=-1"],
     "config key 'compare.slurm.gpus_per_node': -1 (allowed: an integer >= 0)"),
    ("no cpus", ["compare.slurm.cpus_per_task=0"], "'compare.slurm.cpus_per_task': 0 (allowed: an integer >= 1)"),
    ("no memory", ["compare.slurm.mem_gb=0"], "'compare.slurm.mem_gb': 0.0 (allowed: a number or null > 0)"),
    ("gpus not a number", ["compare.slurm.gpus_per_node=two"], "compare.slurm.gpus_per_node"),
    ("unknown launcher", ["compare.launcher=pbs"], "unknown compare.launcher 'pbs'; choose one of: local, slurm"),
    ("unknown cluster", ["compare.slurm.cluster=aws"],
     "unknown compare.slurm.cluster 'aws'; choose one of: slurm, local"),
    ("own key in additional", ["compare.slurm.additional={partition: gpu}"],
     "compare.slurm.additional.partition: set compare.slurm.partition instead"),
    ("time in additional", ["compare.slurm.additional={time: '10:00'}"],
     "compare.slurm.additional.time: set compare.slurm.time instead"),
    ("array parallelism zero", ["compare.slurm.array_parallelism=0"],
     "'compare.slurm.array_parallelism': 0 (allowed: an integer or null >= 1)"),
    ("nodes on the local executor", ["compare.slurm.nodes=2", "compare.slurm.cluster=local"],
     "compare.slurm.nodes=2 needs compare.slurm.cluster=slurm"),
    ("nodes unlike the runs'", ["compare.slurm.nodes=2"],
     "compare.slurm.nodes=2 but the runs' trainer.num_nodes=1: set both to the same number of nodes"),
    ("no Slurm on this machine", ["compare.slurm.cluster=slurm"],
     "compare.slurm.cluster=slurm but this machine has no Slurm (no srun on PATH)"),
    ("no submitit", ["compare.slurm.cluster=local"],
     "compare.launcher=slurm needs the submitit package, which is not installed: pip install 'safety-mirage[slurm]'"),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_slurm_setting_is_one_line(overrides, expected, tmp_path, capfd, monkeypatch):
    from lightning_modules.compare import main

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here (the sbatch test below puts one there)
    if expected.endswith("[slurm]'"):
        monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    out = tmp_path / "cmp"
    code, err = invoke(main, ["--config", "configs/experiment/mirage_compare_quick.yaml", f"run_dir={out}",
                              f"paths.cache={tmp_path / 'cache'}", *BASE, *overrides], capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not out.exists()  # refused before anything was written or submitted


def test_settings_become_the_sbatch_file(tmp_path, monkeypatch):
    """What `cluster=slurm` would submit, without a cluster: submitit's own sbatch text for these settings."""
    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit's test of "on a Slurm cluster"
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    from lightning_modules.config.loading import load_config
    from lightning_modules.experiments.plan import parse_settings
    from lightning_modules.experiments.slurm_runs import make_executor
    from lightning_modules.experiments.slurm_settings import time_minutes

    cfg = load_config("configs/experiment/mirage_compare_quick.yaml", [
        "compare.slurm.partition=gpu", "compare.slurm.time='1-02:00:30'", "compare.slurm.gpus_per_node=2",
        "compare.slurm.cpus_per_task=8", "compare.slurm.mem_gb=64", "compare.slurm.account=lab",
        "compare.slurm.qos=high", "compare.slurm.array_parallelism=4", "compare.slurm.additional={mail-type: END}",
        "compare.slurm.setup=[source .venv/bin/activate]"])
    slurm = parse_settings(cfg).slurm
    assert time_minutes(slurm.time) == 1560 + 1 and time_minutes("90") == 90 and time_minutes("00:30:00") == 30
    executor = make_executor(slurm, tmp_path, "cmp", time_minutes(slurm.time))
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--time=1561", "--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=8",
                 "--mem=64GB", "--account=lab", "--qos=high", "--mail-type=END", "--signal=USR2@90",
                 "--job-name=cmp", "source .venv/bin/activate"):
        assert line in text, line
