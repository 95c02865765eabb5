"""Where a generation command's model runs: the processes `trainer.*` asks for, as a Lightning
`Fabric` (`generation_fabric`), and the Fabric of the processes already launched
(`current_fabric`, set by `lightning_modules.run.ranks.on_ranks`; one device outside a launch)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from core.errors import UserError
from lightning_modules.config.trainer import check_accelerator_exists, collective_timeout, heartbeat_grace

DEFAULT_TIMEOUT_S = 1800  # torch's own default for a collective (gloo)
# Strategies of fit that make no sense for generation, and why.
_NOT_FOR_GENERATION = ("fsdp", "deepspeed", "ddp_spawn", "ddp_fork", "ddp_notebook", "xla", "single")

_FABRIC: Optional[Fabric] = None


def _strategy(spec: Any) -> tuple[str, timedelta]:
    """(name, collective timeout) of `trainer.strategy` for generation: auto or ddp (a name or
    `{name: ddp, timeout: S, heartbeat: S}`; the heartbeat is read by run/ranks.on_ranks)."""
    timeout = timedelta(seconds=DEFAULT_TIMEOUT_S)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"name", "timeout", "heartbeat"})
        if "name" not in spec or unknown:
            raise UserError(f"trainer.strategy for generation takes name, timeout and heartbeat, got {sorted(spec)}")
        if "timeout" in spec:
            timeout = collective_timeout(spec["timeout"])
        heartbeat_grace(spec)  # read by on_ranks once the processes run; refused here, before they start
        spec = spec["name"]
    name = str(spec if spec is not None else "auto")
    if name not in ("auto", "ddp") and (name.startswith(_NOT_FOR_GENERATION) or not name.startswith("ddp")):
        raise UserError(f"trainer.strategy={name} cannot generate: each rank generates with a whole model, so "
                        "generation runs under ddp (one process per device, never spawned); set "
                        "trainer.strategy=ddp or auto")
    return name, timeout


def generation_fabric(cfg) -> Fabric:
    """The processes `cfg.trainer` asks for (accelerator, devices, num_nodes, precision), as a Fabric
    not launched yet."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") is not None else {}
    accelerator = trainer.get("accelerator") or "auto"
    check_accelerator_exists(accelerator)
    name, timeout = _strategy(trainer.get("strategy"))
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < -1) or devices in (0, "0"):
        raise UserError(f"trainer.devices={devices!r} cannot generate: give a number of devices >= 1 (-1 or "
                        "auto: every device; on the CPU, processes), or a list of GPU indices")
    try:
        probe = Fabric(accelerator=accelerator, devices=devices, num_nodes=nodes, strategy="auto",
                       precision=trainer.get("precision"))
        if probe.world_size == 1 and name == "auto":
            return probe
        return Fabric(accelerator=accelerator, devices=devices, num_nodes=nodes,
                      strategy=DDPStrategy(timeout=timeout), precision=trainer.get("precision"))
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as err:
        raise UserError(f"trainer settings cannot generate (accelerator={accelerator}, devices={devices!r}, "
                        f"num_nodes={nodes}): {str(err).strip().splitlines()[0]}") from err


def current_fabric(cfg) -> Fabric:
    """The launched processes' Fabric; outside a command's launch (an in-process call), one device."""
    if _FABRIC is not None:
        return _FABRIC
    trainer = cfg.get("trainer") or {}
    fabric = generation_fabric(OmegaConf.create({"trainer": {"accelerator": trainer.get("accelerator"), "devices": 1,
                                                             "precision": trainer.get("precision")}}))
    fabric.launch()
    return fabric


def set_current_fabric(fabric: Optional[Fabric]) -> None:
    """The launched processes' Fabric (None when the launch ends)."""
    global _FABRIC
    _FABRIC = fabric
