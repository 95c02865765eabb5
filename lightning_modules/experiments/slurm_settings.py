"""The checks of `compare.slurm` the schema cannot make alone (the time limit's forms, sbatch options
given twice, nodes against the runs' trainer), and the one way submitit is imported."""

from __future__ import annotations

import math
import re
import shutil

from core.errors import UserError
from lightning_modules.config.schema import SlurmSettings

INSTALL = "pip install 'safety-mirage[slurm]'"
# sbatch options compare.slurm sets by name: compare.slurm.additional may not set them again
OWN_OPTIONS = {"partition": "partition", "time": "time", "nodes": "nodes", "gpus-per-node": "gpus_per_node",
               "gpus": "gpus_per_node", "gres": "gpus_per_node", "ntasks-per-node": "gpus_per_node",
               "cpus-per-task": "cpus_per_task", "mem": "mem_gb", "account": "account", "qos": "qos",
               "constraint": "constraint", "array": "array_parallelism", "signal": "max_requeues",
               "requeue": "max_requeues"}
TIME = re.compile(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)")
TIME_FORMS = "minutes (e.g. 120), HH:MM:SS or D-HH:MM:SS"


def import_submitit():
    try:
        import submitit
    except ImportError as err:
        raise UserError("compare.launcher=slurm needs the submitit package, which is not installed: "
                        f"{INSTALL}") from err
    return submitit


def check_cluster(slurm: SlurmSettings) -> None:
    """submitit importable, and Slurm reachable from here when cluster=slurm."""
    import_submitit()
    if slurm.cluster == "slurm" and shutil.which("srun") is None:
        raise UserError("compare.slurm.cluster=slurm but this machine has no Slurm (no srun on PATH): run compare "
                        "on the cluster's login node, or set compare.slurm.cluster=local to run the jobs here")


def time_minutes(value: str) -> int:
    """A Slurm time limit in whole minutes (seconds rounded up), or one line naming the forms it takes."""
    text = str(value).strip()
    minutes = None
    if text.isdigit():
        minutes = int(text)
    elif match := TIME.fullmatch(text):
        days, hours, mins, secs = (int(g or 0) for g in match.groups())
        if mins < 60 and secs < 60:
            minutes = days * 1440 + hours * 60 + mins + math.ceil(secs / 60)
    if not minutes:
        raise UserError(f"invalid value for config key 'compare.slurm.time': {value!r} (allowed: {TIME_FORMS}, "
                        "more than zero)")
    return minutes


def slurm_minutes(slurm: SlurmSettings) -> int:
    """compare.slurm checked whole (one line for the first fault); its time limit in minutes."""
    minutes = time_minutes(slurm.time)
    for key in slurm.additional:
        own = OWN_OPTIONS.get(str(key).replace("_", "-"))
        if own:
            raise UserError(f"compare.slurm.additional.{key}: set compare.slurm.{own} instead (additional holds "
                            "only the sbatch options compare.slurm has no key for)")
    if slurm.nodes > 1 and slurm.cluster == "local":
        raise UserError(f"compare.slurm.nodes={slurm.nodes} needs compare.slurm.cluster=slurm (the local executor "
                        "runs on this one machine)")
    return minutes


def nodes_match(slurm: SlurmSettings, num_nodes: int) -> None:
    """A job of several nodes runs one fit across them: its trainer must be told as many."""
    if slurm.nodes != num_nodes:
        raise UserError(f"compare.slurm.nodes={slurm.nodes} but the runs' trainer.num_nodes={num_nodes}: set both "
                        "to the same number of nodes")
