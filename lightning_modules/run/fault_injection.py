"""fit's planted fault (`SAFETY_MIRAGE_FAULT=rank1:kill@step3`, grammar in core/faults.py): a
callback that fires it at the start of the training step named, on the rank named. It exists only
while the variable names a step; generation's stages fire theirs where their batches start."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from core.faults import PlantedFault, planted_fault


class InjectedFault(Callback):
    def __init__(self, fault: PlantedFault):
        self.fault = fault
        self.rank, self.kind, self.step = fault.rank, fault.kind, fault.index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            self.fault.fire()


def injected_faults() -> list[Callback]:
    """The fault `SAFETY_MIRAGE_FAULT` plants in fit, as a callback list (empty when it is unset or
    names another stage)."""
    fault = planted_fault()
    return [InjectedFault(fault)] if fault is not None and fault.stage == "step" else []
