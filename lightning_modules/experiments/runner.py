"""The compare loop: plan every run, keep the finished rows, run the rest (in parallel processes
when `compare.jobs` > 1), then write results.csv, the summary and the figures."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import OmegaConf

from core.errors import UserError
from lightning_modules.config.loading import to_yaml
from lightning_modules.experiments.parallel_runs import interleave, process_pool_available, run_parallel
from lightning_modules.config.diff import changed_keys, flatten
from lightning_modules.experiments.plan import (RunKey, apply_command_line, config_hash,
                                                parse_settings, plan, run_config, run_path)
from lightning_modules.experiments.results import (key_tuple, metrics_row, world_rho, read_results, row_key, write_results)
from lightning_modules.experiments.summary import summarize, write_summary
from lightning_modules.experiments.plots import attribution_by_method, plot_all
from lightning_modules.run import training
from lightning_modules.run.run_dir import fresh_run_dir


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
    previous = read_results(csv).to_dict("records") if csv.exists() else []
    done = {row_key(r): r for r in previous}
    keys = plan(settings, common)
    dev = sorted({k.world_seed for k in keys} & set(settings.dev_world_seeds))
    if dev and settings.split == "test":
        print(f"compare: world seed(s) {dev} are dev worlds (compare.dev_world_seeds), used to choose "
              "hyperparameters: this table is not a held-out result")
    # Every planned config first: a stale row is refused before anything runs.
    planned = []
    for key in keys:
        path = run_path(out, key, settings.sweep_key)
        row = done.get(key_tuple(key))
        cfg_run = run_config(settings, key, common, path)
        digest = config_hash(cfg_run)
        if row is not None and row["config_hash"] != digest:
            old_yaml = out / row["run_dir"] / "config.yaml"
            # model.name_or_path: fit rewrites it to the cached base's path
            diff = [k for k in changed_keys(flatten(OmegaConf.load(old_yaml)), flatten(cfg_run), shared_only=True)
                    if k != "model.name_or_path"] if old_yaml.is_file() else ["?"]
            changed = ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
            if not diff:  # the same run under a grown schema: keep it, under the new hash
                row = {**row, "config_hash": digest}
        if row is not None and row["config_hash"] != digest:
            if settings.on_stale == "refuse":
                raise UserError(f"{csv}: the finished run ({key.label()}) was made with another run config "
                                f"(changed: {changed}); pass compare.on_stale=redo to run it again, or use a new run_dir")
            print(f"compare: redoing ({key.label()}): its run config changed ({changed})")
            row = None
        planned.append((key, path, digest, row, cfg_run))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    dropped = len(done.keys() - {key_tuple(k) for k in keys})
    if dropped:
        print(f"compare: {dropped} earlier row(s) are not in this plan and leave results.csv (their run dirs stay)")
    rows = [row for _, _, _, row, _ in planned if row is not None]
    kept = len(rows)
    todo = []  # (key, digest, run config) of each run still to do, in its own fresh directory
    for key, path, digest, row, cfg_run in planned:
        if row is None:
            cfg_run.run_dir = str(fresh_run_dir(path))  # not hashed: the config as planned, moved
            todo.append((key, digest, cfg_run))

    def record(key: RunKey, digest: str, cfg_run, wall: float) -> None:
        run_dir = Path(cfg_run.run_dir)
        rows.append({**dataclasses.asdict(key), **metrics_row(run_dir), "rho": world_rho(run_dir),
                     "wall_s": round(wall, 1), "run_dir": str(run_dir.relative_to(out)), "config_hash": digest})
        write_results(rows, csv)  # after every run

    jobs = settings.jobs
    if jobs > 1 and len(todo) > 1 and (why := process_pool_available()):
        print(f"compare: compare.jobs={jobs} needs worker processes, which cannot start here ({why}); "
              "running the runs one after another")
        jobs = 1
    if jobs == 1 or len(todo) <= 1:
        for key, digest, cfg_run in todo:
            start = time.perf_counter()
            training.run(cfg_run)  # sets cfg_run.run_dir to the directory it used
            record(key, digest, cfg_run, time.perf_counter() - start)
    else:
        # Runs of different worlds first: runs of one world wait for its base to be built.
        todo = interleave(todo, lambda item: (item[0].world_seed, item[0].base_seed))
        total = len(todo)
        print(f"compare: {total} runs, {jobs} at a time; each run's output: {out / 'logs'}")

        def finished(item, wall: float) -> None:
            record(*item, wall)
            print(f"compare: [{len(rows) - kept}/{total}] {item[0].label()}: {wall:.0f} s", flush=True)

        tasks = [(item, item[2], out / "logs" / f"{Path(item[2].run_dir).relative_to(out)}.log") for item in todo]
        run_parallel(tasks, jobs, finished, lambda item: item[0].label())
    order = {key_tuple(k): i for i, (k, *_rest) in enumerate(planned)}
    rows.sort(key=lambda r: order[row_key(r)])
    results = write_results(rows, csv)
    summary = summarize(results, settings.confidence)
    text = write_summary(summary, settings, out, attribution_by_method(results, out))
    plot_all(results, summary, settings, out)
    print(f"\n{text}\nwritten to {out}")
    return results


