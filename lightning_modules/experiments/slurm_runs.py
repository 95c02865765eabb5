"""compare's Slurm launcher (`compare.launcher=slurm`): each run one submitit job, the runs of one
comparison one job array, with the GPUs, CPUs, memory, time and partition of `compare.slurm`.

A job runs `fit` with `resume=auto`: when Slurm pre-empts it or its time runs out, submitit calls
`RunJob.checkpoint`, which requeues the same run, and the requeued job resumes from the run's newest
checkpoint (last.ckpt, or Lightning's hpc_ckpt_N.ckpt). compare waits, printing how many jobs
finished, run and failed, and records each finished run as the local launcher does. A failed or
killed job leaves its run unrecorded: the same compare command again runs exactly those runs (each
resuming from its checkpoint) and keeps every recorded one. `compare.slurm.cluster=local` runs the
same submitit code path with each job a local process (submitit's LocalExecutor): the tests' path.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

from core.errors import UserError, one_line
from lightning_modules.config.schema import SlurmSettings
from lightning_modules.experiments.parallel_runs import fit_logged
from lightning_modules.experiments.results import write_run_marker
from lightning_modules.experiments.slurm_settings import import_submitit, nodes_match, slurm_minutes

try:  # an optional dependency: launcher=slurm says how to install it (import_submitit)
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # pragma: no cover - exercised by the test that hides submitit
    Checkpointable, DelayedSubmission = object, None


def make_executor(slurm: SlurmSettings, folder: Path, name: str, minutes: int):
    """A submitit executor with the job resources of `compare.slurm` (one task per GPU)."""
    submitit = import_submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=slurm.cluster,
                                     slurm_max_num_timeout=slurm.max_requeues, local_max_num_timeout=slurm.max_requeues)
    executor.update_parameters(
        name=name, timeout_min=minutes, nodes=slurm.nodes, tasks_per_node=max(1, slurm.gpus_per_node),
        gpus_per_node=slurm.gpus_per_node or None, cpus_per_task=slurm.cpus_per_task, mem_gb=slurm.mem_gb,
        slurm_partition=slurm.partition, slurm_account=slurm.account, slurm_qos=slurm.qos,
        slurm_constraint=slurm.constraint, slurm_array_parallelism=slurm.array_parallelism,
        slurm_additional_parameters=dict(slurm.additional) or None,
        **({"slurm_setup": list(slurm.setup), "local_setup": list(slurm.setup)} if slurm.setup else {}))
    return executor


class RunJob(Checkpointable):
    """One planned run as a job: fit with resume=auto, its output in `log`; returns where it ran and its
    wall time, or the one-line error of a run that stopped on bad input (its traceback is in `log`)."""

    def __init__(self, cfg, log: str, digest: str):
        self.cfg, self.log, self.digest = cfg, log, digest

    def __call__(self) -> dict:
        cfg = copy.deepcopy(self.cfg)
        cfg.resume = "auto"  # a fresh start, or a requeued job's resume from its newest checkpoint
        try:
            wall = fit_logged(cfg, self.log)  # sets cfg.run_dir to the directory the run used
        except Exception as err:  # noqa: BLE001 -- reported by compare in one line; the log has the traceback
            return {"error": one_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"}
        write_run_marker(Path(cfg.run_dir), self.digest, wall)  # a later compare finds it even if this one died
        return {"run_dir": str(cfg.run_dir), "wall_s": wall}

    def checkpoint(self, *args, **kwargs):
        """Pre-empted or out of time: the same run again (it resumes from its newest checkpoint)."""
        return DelayedSubmission(RunJob(self.cfg, self.log, self.digest))


def job_outcome(job) -> dict:
    """What the job returned, or why it returned nothing (killed, out of memory, requeued too often)."""
    try:
        return job.results()[0]  # task 0's (a job of several GPUs has a task, a rank, per GPU)
    except Exception as err:  # noqa: BLE001 -- submitit's FailedJobError / UncompletedJobError, multi-line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return {"error": f"job {job.job_id} ended without a result (killed?): {first[:300]}"}


def run_on_slurm(todo: list, slurm: SlurmSettings, num_nodes: int, out: Path, name: str,
                 record: Callable, describe: Callable, log_of: Callable) -> None:
    """Submit `todo` as one job array, wait, `record(run, wall_s)` as each finishes; failures are
    raised together at the end, after every job has ended (their runs stay unrecorded)."""
    nodes_match(slurm, num_nodes)
    minutes = slurm_minutes(slurm)
    folder = out / "slurm"
    executor = make_executor(slurm, folder, name, minutes)
    with executor.batch():  # one array on Slurm
        jobs = [executor.submit(RunJob(run.cfg, str(log_of(run)), run.digest)) for run in todo]
    pending = dict(zip(jobs, todo))
    array = str(jobs[0].job_id).split("_")[0]
    print(f"compare: {len(todo)} run{'s' if len(todo) > 1 else ''} submitted as job array {array} "
          f"(compare.slurm.cluster={slurm.cluster}); each run's output: {out / 'logs'}; submitit's files: {folder}",
          flush=True)
    failures, finished, shown = [], 0, None
    try:
        while pending:
            for job, run in list(pending.items()):
                if not job.done():
                    continue
                del pending[job]
                outcome = job_outcome(job)
                if "error" in outcome:
                    failures.append((run, outcome["error"]))
                    continue
                run.cfg.run_dir = outcome["run_dir"]
                try:
                    record(run, outcome["wall_s"])
                except UserError as err:  # e.g. a run that wrote no results.json: the other jobs go on
                    failures.append((run, one_line(err)))
                    continue
                finished += 1
            running = sum(job.state == "RUNNING" for job in pending)
            counts = (finished, running, len(failures), len(pending) - running)
            if counts != shown:
                print("compare: {} finished, {} running, {} failed, {} waiting (of {})".format(*counts, len(todo)),
                      flush=True)
                shown = counts
            if pending:
                time.sleep(slurm.poll_s)
    except KeyboardInterrupt:
        going = f"the jobs go on (scancel {array} stops them)" if slurm.cluster == "slurm" else \
            "local jobs stop with it (Ctrl-C reaches them too)"
        print(f"compare: stopped waiting; {going}. The same compare command records what finished and runs the "
              "rest again", flush=True)
        raise
    if failures:
        shown_failures = "; ".join(f"({describe(run)}): {error} (its output: {log_of(run)})"
                                   for run, error in failures[:3])
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise UserError(f"{len(failures)} of {len(todo)} runs failed: {shown_failures}{more}; the same compare "
                        "command runs exactly these again (each from its last checkpoint)")
