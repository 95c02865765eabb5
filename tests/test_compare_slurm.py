"""compare.launcher=slurm through submitit's local executor (compare.slurm.cluster=local: the real
submitit code path, each job a local process): the same results.csv as the local launcher; a job
pre-empted mid-run (USR2, what Slurm sends before it pre-empts a submitit job) is requeued and resumes
from its checkpoint; a job SIGKILLed mid-run fails, and the same compare command then runs exactly
that run again, resuming it; jobs racing for one world and one base build each once; results.csv is
never left with a half row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import SMALL
from lightning_modules.config.loading import load_config
from lightning_modules.experiments import runner
from lightning_modules.experiments.results import COLUMNS, read_results, write_results
from test_bad_inputs import REPO, cli_env

COMPARE = "configs/experiment/mirage_compare_quick.yaml"
RUN = "world0-base0-seed0"
MAX_STEPS = 12
WORLD = [o for o in SMALL if o.startswith("data.world.")]  # the world's own keys go on the command line


def settings(out: Path, cache: Path) -> list[str]:
    train = [o for o in SMALL if not o.startswith(("data.world.", "trainer.max_steps", "trainer.val_check"))] + [
        f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=6", "eval.val_at_start=false",
        "checkpoint.every_n_train_steps=2", "trainer.deterministic=true",
        "eval.probes=false"]
    return [f"compare.overrides=[{','.join(train)}]", "compare.methods=[sft,ga]", "compare.seeds=[0]",
            "compare.world_seeds=[0]", "compare.base_seeds=[0]", "compare.jobs=1", "threads=1",
            f"run_dir={out}", f"paths.cache={cache}"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)


def job_pid(run_dir: Path) -> int:
    """The job process that runs in `run_dir` (the run-directory lock names its holder)."""
    return int((run_dir / ".lock").read_text().split()[0])


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]


@pytest.mark.slow
@pytest.mark.scale
def test_slurm_launcher_matches_local_and_survives_preemption_and_kills(tmp_path):
    cache = tmp_path / "cache"
    local = runner.run(load_config(COMPARE, settings(tmp_path / "local", cache)), WORLD)  # in this process

    out = tmp_path / "slurm"
    command = [sys.executable, "-m", "lightning_modules.compare", "--config", COMPARE, *settings(out, cache),
               "compare.launcher=slurm", "compare.slurm.cluster=local", "compare.slurm.poll_s=0.2", *WORLD]
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sft, ga = out / "sft" / RUN, out / "ga" / RUN
    wait_for(sft / "checkpoints" / "last.ckpt", proc)
    os.kill(job_pid(sft), signal.SIGUSR2)  # pre-empted: submitit calls RunJob.checkpoint and requeues
    preempted_at = step_of(sft / "checkpoints" / "last.ckpt")
    wait_for(ga / "checkpoints" / "last.ckpt", proc)
    os.kill(job_pid(ga), signal.SIGKILL)  # killed: no Python runs, the job ends without a result
    killed_at = step_of(ga / "checkpoints" / "last.ckpt")
    output, _ = proc.communicate(timeout=600)
    assert 0 < preempted_at < MAX_STEPS and 0 < killed_at < MAX_STEPS, (preempted_at, killed_at)

    assert proc.returncode == 2, output
    assert "compare: 2 runs submitted as job array" in output
    assert "compare: 1 finished, 0 running, 1 failed, 0 waiting (of 2)" in output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: 1 of 2 runs failed: (method=ga, world_seed=0, base_seed=0, seed=0): job ") and \
        "ended without a result (killed?)" in error and "the same compare command runs exactly these again" in error
    first = read_results(out / "results.csv")
    assert list(first.method) == ["sft"]  # the finished run is recorded
    sft_log = (out / "logs" / "sft" / f"{RUN}.log").read_text()
    assert "Restored all states from the checkpoint" in sft_log  # the requeued job resumed
    assert "this job is preempted" in sft_log and "Requeued job" in sft_log  # submitit's own words

    again = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "compare: 1 run submitted as job array" in again.stdout  # exactly the failed run
    assert "Restored all states from the checkpoint" in (out / "logs" / "ga" / f"{RUN}.log").read_text()
    results = read_results(out / "results.csv")
    pd.testing.assert_frame_equal(results.drop(columns="wall_s"), local.drop(columns="wall_s"))
    assert results.wall_s[0] == first.wall_s[0]  # sft kept, not run again


RACE = """
import os, sys, time
from pathlib import Path
from datamodules import mirage_world
from datamodules.safety import resolve_data_files
from lightning_modules.config.loading import load_config
from lightning_modules.run import pretrain

log, go = Path(sys.argv[1]), Path(sys.argv[2])

def counted(build, what):
    def wrapped(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{what} {os.getpid()}\\n")
        return build(*args, **kwargs)
    return wrapped

mirage_world._generate = counted(mirage_world._generate, "world")
pretrain._build_tiny_base = counted(pretrain._build_tiny_base, "base")
cfg = load_config("configs/demo.yaml", sys.argv[3:])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.005)
files = resolve_data_files(cfg.data)
print(files.world_dir, pretrain.ensure_tiny_base(cfg, files))
"""


@pytest.mark.slow
@pytest.mark.scale
def test_jobs_racing_for_one_world_and_base_build_each_once(tmp_path):
    """Two processes (two array jobs of one world) ask for the world and its base at the same moment."""
    log, go, cache = tmp_path / "builds.log", tmp_path / "go", tmp_path / "cache"
    command = [sys.executable, "-c", RACE, str(log), str(go), *SMALL, f"paths.cache={cache}", "threads=1"]
    procs = [subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    while len(list(tmp_path.glob("ready-*"))) < 2:  # both imported and waiting
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(line.split()[0] for line in log.read_text().splitlines()) == ["base", "world"]
    dirs = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert dirs[0] == dirs[1]  # the same world and base directories
    leftovers = [p.name for p in cache.rglob(".*") if ".tmp-" in p.name]
    assert not leftovers


def test_compare_killed_while_writing_results_leaves_no_half_row(tmp_path):
    """SIGKILL at moments the writer cannot predict: results.csv always reads back whole."""
    for n, delay in enumerate((0.05, 0.2, 0.45)):
        csv = tmp_path / f"{n}" / "results.csv"
        csv.parent.mkdir()
        pid = os.fork()  # a writer with this process's imports: it writes at once
        if pid == 0:
            rows = []
            try:
                for i in range(10**6):
                    rows.append({c: 0.25 for c in COLUMNS} | {"method": "sft", "seed": i, "run_dir": f"sft/seed{i}",
                                                              "config_hash": "0123456789abcdef"})
                    write_results(rows, csv)
            finally:
                os._exit(0)
        while not csv.exists():
            time.sleep(0.001)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        assert os.waitpid(pid, 0)[1] == signal.SIGKILL
        rows = read_results(csv)  # a cut line or a foreign header would be one-line errors
        assert len(rows) > 0 and list(rows.seed) == list(range(len(rows)))
        assert (rows.config_hash == "0123456789abcdef").all()
