"""Experiment loggers from the `logger:` config group (configs/logger/*.yaml) and the hyperparameter
summary logged to them (sample generations: `methods.sample_log`).

    logger:                      # one entry per logger: <kind>: {keyword arguments of its class}
      tensorboard: {}            # the default (an empty `logger:` section means TensorBoard)
      csv: {}
      wandb: {project: safety-mirage, offline: true}   # needs `pip install wandb`

`trainer.logger=false` turns every logger off. Loggers write under the run directory unless the
entry sets `save_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import OmegaConf

from core.errors import UserError

KINDS = ("tensorboard", "csv", "wandb")


def _defaults(kind: str, run_dir: Path, run_name: str) -> dict[str, Any]:
    if kind == "tensorboard":
        return dict(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    if kind == "csv":
        return dict(save_dir=str(run_dir), name="csv", version="")
    return dict(save_dir=str(run_dir), name=run_name, project="safety-mirage")


def _logger_class(kind: str) -> type[Logger]:
    if kind == "tensorboard":
        return TensorBoardLogger
    if kind == "csv":
        return CSVLogger
    try:
        import wandb  # noqa: F401  # WandbLogger imports it only when the run starts
    except ImportError as err:
        raise UserError("logger.wandb needs the wandb package: pip install wandb "
                        "(or choose logger=tensorboard / logger=csv)") from err
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger


def build_loggers(cfg, run_dir: Path) -> Union[list[Logger], bool]:
    """The loggers of a run (`False` when `trainer.logger` is false)."""
    switch = cfg.trainer.get("logger", True)
    if switch is False or switch is None:
        return False
    if switch is not True:
        raise UserError(f"trainer.logger must be true or false, got {switch!r}; choose loggers with logger=<name> "
                        f"(configs/logger: {', '.join(KINDS)})")
    specs = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    specs = specs or {"tensorboard": {}}
    loggers = []
    for kind, kwargs in specs.items():
        if kind not in KINDS:
            raise UserError(f"unknown logger '{kind}' in logger:; choose from {', '.join(KINDS)}")
        if kwargs is False or (kwargs is not None and not isinstance(kwargs, dict)):
            raise UserError(f"logger.{kind} must be a mapping of keyword arguments, got {kwargs!r}")
        cls = _logger_class(kind)
        try:
            loggers.append(cls(**{**_defaults(kind, run_dir, str(cfg.name)), **(kwargs or {})}))
        except TypeError as err:
            raise UserError(f"logger.{kind}: {str(err).splitlines()[0]}") from err
    return loggers


def log_hparams_summary(loggers: list[Logger], params: dict, metrics: dict[str, float]) -> None:
    """Hyperparameters against the final metrics (TensorBoard's HParams view; others: params + metrics)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=metrics)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(metrics)
