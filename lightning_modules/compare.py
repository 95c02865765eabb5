"""Every method of an experiment family over a seed stack (and optionally a swept key): the
paper's Table 1, measured with intervals over worlds.

    python -m lightning_modules.compare --config configs/experiment/mirage_compare.yaml [key=value ...]

Each run is an ordinary `fit` run of the family's experiment file (`compare.experiment`, e.g.
`mirage_{method}` or `vlguard_{method}`) with `compare.overrides` and the command line's own
top-level overrides applied. The seed stack varies the world (`data.world.seed`, listed in
`compare.world_seeds`), the tiny base (`base.seed`, `compare.base_seeds`) and the alignment run
(`seed`, `compare.seeds`); `base` is the unaligned base model, evaluated once per (swept value,
world, base seed). `data.world.seed=S`,
`base.seed=S` or `seed=S` on the command line replace that list by [S].

Writes into `run_dir`: `results.csv` (one row per run, rates as fractions, NaN where a run has
no such eval set), `summary.md` / `summary.json` (mean and interval per method: t over worlds,
t over runs within one world, or Wilson for one run), and the figures of `lightning_modules.
experiments.plots`. A rerun resumes: rows whose run config is unchanged are kept; a changed one is
refused (`compare.on_stale=refuse`) or run again into a fresh directory (`on_stale=redo`).
With `compare.launcher=slurm` each run is a Slurm job (one job array, `compare.slurm`), requeued
and resumed when pre-empted; the same command again runs exactly the runs that failed.
"""

from __future__ import annotations

from core.errors import cli_main
from lightning_modules.config.loading import config_cli
from lightning_modules.config.schema import CompareConfig
from lightning_modules.experiments.runner import run


@cli_main
def main(argv: list[str]) -> None:
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    config_cli(argv, "python -m lightning_modules.compare", __doc__.splitlines()[0],
               "configs/experiment/mirage_compare.yaml", lambda cfg: run(cfg, overrides), CompareConfig)


if __name__ == "__main__":
    main()
