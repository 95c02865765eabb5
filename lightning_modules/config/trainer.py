"""The `trainer:` section turned into a lightning.Trainer: the one place a Trainer is built from
settings (fit, evaluate's generation, the tiny-base pre-training), so a setting Lightning refuses
ends in the same one line everywhere."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from core.errors import UserError


def trainer_kwargs(trainer_cfg) -> dict[str, Any]:
    """The config's `trainer:` section as keyword arguments (resolved, plain Python)."""
    return dict(OmegaConf.to_container(trainer_cfg, resolve=True)) if trainer_cfg is not None else {}


def make_trainer(**kwargs) -> L.Trainer:
    """lightning.Trainer(**kwargs), a refused argument reported in one line."""
    try:
        return L.Trainer(**kwargs)
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise UserError(f"invalid trainer config: {str(err).splitlines()[0]}") from err
