"""The `trainer:` section turned into a lightning.Trainer: the one place a Trainer is built from
settings (fit, evaluate's generation, the tiny-base pre-training), so a setting Lightning refuses
ends in the same one line everywhere."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from core.errors import UserError


def trainer_kwargs(trainer_cfg) -> dict[str, Any]:
    """The config's `trainer:` section as keyword arguments (resolved, plain Python)."""
    return dict(OmegaConf.to_container(trainer_cfg, resolve=True)) if trainer_cfg is not None else {}


def check_accelerator_exists(accelerator) -> None:
    """A GPU config on a machine without one (a laptop trying an experiment config): say which
    setting to change, rather than Lightning's "No supported gpu backend found!". Not switched
    silently: an experiment sized for a GPU would run for days on a CPU."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={name} but torch finds no CUDA GPU on this machine; add trainer=cpu "
                        "to the command line (or trainer.accelerator=cpu to keep the other trainer settings)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.accelerator=mps but this machine has no Apple GPU; add trainer=cpu to the command line")


def make_trainer(**kwargs) -> L.Trainer:
    """lightning.Trainer(**kwargs), a refused argument reported in one line."""
    check_accelerator_exists(kwargs.get("accelerator"))
    try:
        return L.Trainer(**kwargs)
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise UserError(f"invalid trainer config: {str(err).splitlines()[0]}") from err


def collective_timeout(seconds: Any) -> timedelta:
    """`trainer.strategy.timeout` (seconds): how long a rank waits in a collective for a rank that
    died or hangs before it stops with a line of its own (torch's default: 30 min, NCCL 10 min)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise UserError(f"invalid value for config key 'trainer.strategy.timeout': {seconds!r} "
                        "(allowed: a number of seconds > 0)")
    return timedelta(seconds=seconds)


HEARTBEAT_S = 30  # default of `trainer.strategy.heartbeat`: far above any pause of a live rank's beat thread


def heartbeat_grace(strategy: Any) -> float:
    """`trainer.strategy.heartbeat` (seconds; HEARTBEAT_S unless the strategy mapping sets it): how
    long a rank of a multi-process run may go without a heartbeat (killed, its node lost) before the
    others stop and name it (lightning_modules/run/heartbeat.py). Ranks beat every second."""
    strategy = OmegaConf.to_container(strategy, resolve=True) if OmegaConf.is_config(strategy) else strategy
    seconds = strategy.get("heartbeat", HEARTBEAT_S) if isinstance(strategy, dict) else HEARTBEAT_S
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 3:
        raise UserError(f"invalid value for config key 'trainer.strategy.heartbeat': {seconds!r} "
                        "(allowed: a number of seconds >= 3)")
    return float(seconds)
