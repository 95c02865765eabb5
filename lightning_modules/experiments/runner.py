"""The compare loop: plan every run, keep the finished rows, run the rest (in parallel processes
when `compare.jobs` > 1, or as Slurm jobs with `compare.launcher=slurm`), then write results.csv,
the summary and the figures."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import OmegaConf

from core.errors import UserError
from core.files import atomic_write, writing
from lightning_modules.config.loading import to_yaml
from lightning_modules.experiments.parallel_runs import interleave, process_pool_available, run_parallel
from lightning_modules.config.diff import changed_keys, flatten
from lightning_modules.experiments.plan import (RunKey, apply_command_line, config_hash,
                                                parse_settings, plan, run_config, run_path)
from lightning_modules.experiments.results import (adopted_run, key_tuple, metrics_row, world_rho, read_results,
                                                   row_key, write_results, write_run_marker)
from lightning_modules.experiments.summary import summarize, write_summary
from lightning_modules.experiments.plots import attribution_by_method, plot_all
from lightning_modules.run import training
from lightning_modules.run.run_dir import fresh_run_dir


@dataclasses.dataclass
class PlannedRun:
    """One run of the plan: its key, its fit config (hashed as planned), and its finished row if
    results.csv already holds one for this config."""

    key: RunKey
    cfg: Any
    digest: str
    row: Optional[dict] = None

    def label(self) -> str:
        return self.key.label()


def stale_keys(out: Path, row: dict, cfg_run) -> list[str]:
    """The settings that changed since `row`'s run (["?"] when its config.yaml is gone)."""
    old_yaml = out / row["run_dir"] / "config.yaml"
    if not old_yaml.is_file():
        return ["?"]
    # model.name_or_path: fit rewrites it to the cached base's path; resume: auto in a Slurm job
    return [k for k in changed_keys(flatten(OmegaConf.load(old_yaml)), flatten(cfg_run), shared_only=True)
            if k not in ("model.name_or_path", "resume")]


def plan_runs(settings, common: list[str], out: Path, done: dict[tuple, dict]) -> list[PlannedRun]:
    """Every planned run with its config, and the finished row it keeps: a row made with another run
    config is refused (on_stale=refuse) or dropped to be redone, before anything runs."""
    planned = []
    for key in plan(settings, common):
        cfg_run = run_config(settings, key, common, run_path(out, key, settings.sweep_key))
        run = PlannedRun(key, cfg_run, config_hash(cfg_run), done.get(key_tuple(key)))
        if run.row is not None and run.row["config_hash"] != run.digest:
            diff = stale_keys(out, run.row, cfg_run)
            changed = ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
            if not diff:  # the same run under a grown schema: keep it, under the new hash
                run.row = {**run.row, "config_hash": run.digest}
            elif settings.on_stale == "refuse":
                raise UserError(f"{out / 'results.csv'}: the finished run ({run.label()}) was made with another run "
                                f"config (changed: {changed}); pass compare.on_stale=redo to run it again, or use "
                                "a new run_dir")
            else:
                print(f"compare: redoing ({run.label()}): its run config changed ({changed})")
                run.row = None
        planned.append(run)
    return planned


def num_nodes(runs: list[PlannedRun]) -> int:
    return int(runs[0].cfg.trainer.get("num_nodes", 1) or 1)


def check_launcher(settings, planned: list[PlannedRun]) -> None:
    """launcher=slurm: submitit importable and compare.slurm consistent, before anything is written."""
    if settings.launcher == "slurm" and planned:
        from lightning_modules.experiments.slurm_settings import check_cluster, nodes_match

        nodes_match(settings.slurm, num_nodes(planned))
        check_cluster(settings.slurm)


def log_path(out: Path, run: PlannedRun) -> Path:
    return out / "logs" / f"{Path(run.cfg.run_dir).relative_to(out)}.log"


def execute(todo: list[PlannedRun], settings, out: Path, record) -> None:
    """Run `todo`, one after another in this process, `jobs` at a time in worker processes, or as
    Slurm jobs (compare.launcher=slurm); `record(run, wall_seconds)` after each."""
    if settings.launcher == "slurm" and todo:
        from lightning_modules.experiments.slurm_runs import run_on_slurm

        run_on_slurm(todo, settings.slurm, num_nodes(todo), out, out.name, record, PlannedRun.label,
                     lambda run: log_path(out, run))
        return
    jobs = settings.jobs
    if jobs > 1 and len(todo) > 1 and (why := process_pool_available()):
        print(f"compare: compare.jobs={jobs} needs worker processes, which cannot start here ({why}); "
              "running the runs one after another")
        jobs = 1
    if jobs == 1 or len(todo) <= 1:
        for run in todo:
            start = time.perf_counter()
            training.run(run.cfg)  # sets run.cfg.run_dir to the directory it used
            record(run, time.perf_counter() - start)
        return
    # Runs of different worlds first: runs of one world wait for its base to be built.
    todo = interleave(todo, lambda run: (run.key.world_seed, run.key.base_seed))
    print(f"compare: {len(todo)} runs, {jobs} at a time; each run's output: {out / 'logs'}")
    progress = iter(range(1, len(todo) + 1))

    def finished(run: PlannedRun, wall: float) -> None:
        record(run, wall)
        print(f"compare: [{next(progress)}/{len(todo)}] {run.label()}: {wall:.0f} s", flush=True)

    tasks = [(run, run.cfg, log_path(out, run)) for run in todo]
    run_parallel(tasks, jobs, finished, PlannedRun.label)


def run(cfg, command_line: Optional[list[str]] = None) -> pd.DataFrame:
    """Run (or resume) every planned run and write the tables and figures; `command_line` holds the
    compare command's own key=value overrides, which reach every run."""
    settings = parse_settings(cfg)
    common = apply_command_line(settings, list(command_line or []))
    common.append(f"paths.cache={cfg.paths.cache}")
    if cfg.threads:
        common.append(f"threads={cfg.threads}")
    out = Path(cfg.run_dir)
    csv = out / "results.csv"
    done = {row_key(r): r for r in (read_results(csv).to_dict("records") if csv.exists() else [])}
    planned = plan_runs(settings, common, out, done)
    check_launcher(settings, planned)
    dev = sorted({run.key.world_seed for run in planned} & set(settings.dev_world_seeds))
    if dev and settings.split == "test":
        print(f"compare: world seed(s) {dev} are dev worlds (compare.dev_world_seeds), used to choose "
              "hyperparameters: this table is not a held-out result")
    with writing("compare directory", out):
        out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", to_yaml(cfg), what="compare config")
    dropped = len(done.keys() - {key_tuple(run.key) for run in planned})
    if dropped:
        print(f"compare: {dropped} earlier row(s) are not in this plan and leave results.csv (their run dirs stay)")
    rows = [run.row for run in planned if run.row is not None]

    def record(run: PlannedRun, wall: float) -> None:
        run_dir = Path(run.cfg.run_dir)
        write_run_marker(run_dir, run.digest, wall)
        rows.append({**dataclasses.asdict(run.key), **metrics_row(run_dir), "rho": world_rho(run_dir),
                     "wall_s": round(wall, 1), "run_dir": str(run_dir.relative_to(out)), "config_hash": run.digest})
        write_results(rows, csv)  # after every run

    todo = []
    for run in (run for run in planned if run.row is None):
        if (found := adopted_run(Path(run.cfg.run_dir), run.digest)) is not None:
            # finished after an earlier compare stopped waiting for it (a Slurm job outlives its compare)
            print(f"compare: ({run.label()}) finished in {found[0]} after the last compare: recorded")
            run.cfg.run_dir = str(found[0])
            record(run, found[1])
            continue
        run.cfg.run_dir = str(fresh_run_dir(Path(run.cfg.run_dir)))  # not hashed: the config as planned, moved
        todo.append(run)

    execute(todo, settings, out, record)
    order = {key_tuple(run.key): i for i, run in enumerate(planned)}
    rows.sort(key=lambda r: order[row_key(r)])
    results = write_results(rows, csv)
    summary = summarize(results, settings.confidence)
    text = write_summary(summary, settings, out, attribution_by_method(results, out))
    plot_all(results, summary, settings, out)
    print(f"\n{text}\nwritten to {out}")
    return results
