"""Experiment loggers from the `logger:` config group (configs/logger/*.yaml) and what is logged
to them beyond scalars: the hyperparameter summary and sample generations.

    logger:                      # one entry per logger: <kind>: {keyword arguments of its class}
      tensorboard: {}            # the default (an empty `logger:` section means TensorBoard)
      csv: {}
      wandb: {project: safety-mirage, offline: true}   # needs `pip install wandb`

`trainer.logger=false` turns every logger off. Loggers write under the run directory unless the
entry sets `save_dir`. Samples: a table with the images where the logger can show one (W&B Table;
TensorBoard text plus one image per sample), JSON lines (`<stage>_samples.jsonl` in the logger's
folder) elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import OmegaConf
from PIL import Image

from core.errors import UserError

KINDS = ("tensorboard", "csv", "wandb")
THUMBNAIL = 256  # longest side of a logged sample image, in pixels


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


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            return np.asarray(img)
    except OSError:
        return None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def log_samples(loggers: list[Logger], stage: str, samples: dict[str, list[dict]], step: int) -> None:
    """Sample generations per eval set (`{"prompt", "response", "image"}` rows) to every logger."""
    if not samples:
        return
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            for name, rows in samples.items():
                table = ["| # | prompt | response |", "|---|---|---|"]
                table += [f"| {i} | {_cell(r['prompt'])} | {_cell(r['response'])} |" for i, r in enumerate(rows)]
                writer.add_text(f"{stage}_samples/{name}", "\n".join(table), step)
                for i, r in enumerate(rows):
                    pixels = _thumbnail(r["image"]) if r.get("image") else None
                    if pixels is not None:
                        writer.add_image(f"{stage}_samples/{name}/{i}", pixels, step, dataformats="HWC")
        elif type(logger).__name__ == "WandbLogger":
            import wandb

            data = [[name, wandb.Image(r["image"]) if r.get("image") else None, r["prompt"], r["response"]]
                    for name, rows in samples.items() for r in rows]
            logger.log_table(key=f"{stage}_samples", columns=["eval_set", "image", "prompt", "response"],
                             data=data, step=step)
        elif getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / f"{stage}_samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                for name, rows in samples.items():
                    for r in rows:
                        fh.write(json.dumps({"step": step, "eval_set": name, **r}, ensure_ascii=False) + "\n")
