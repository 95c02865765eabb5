"""A fault planted on one rank of a fit, for the tests of what a fault leaves behind:
`SAFETY_MIRAGE_FAULT=rank1:kill@step3` (raise | kill | oom at the start of a training step, on the
rank named). The callback exists only while the variable is set; nothing else reads it.

- raise: a RuntimeError, as a bug on that rank would;
- kill: SIGKILL to the rank itself, as the kernel's OOM killer or a lost node would;
- oom: a raised `torch.OutOfMemoryError`, as the allocator raises it on a GPU.
"""

from __future__ import annotations

import os
import re
import signal

import torch
from lightning.pytorch.callbacks import Callback

from core.errors import UserError

FAULT_ENV = "SAFETY_MIRAGE_FAULT"
_SPEC = re.compile(r"rank(\d+):(raise|kill|oom)@step(\d+)")


class InjectedFault(Callback):
    def __init__(self, rank: int, kind: str, step: int):
        self.rank, self.kind, self.step = rank, kind, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        raise RuntimeError(f"injected fault at step {self.step}")


def injected_faults() -> list[Callback]:
    """The fault `SAFETY_MIRAGE_FAULT` asks for, as a callback list (empty when it is unset)."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return []
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise UserError(f"{FAULT_ENV}={spec!r} is not a fault: give rank<R>:<raise|kill|oom>@step<S>, "
                        "e.g. rank1:kill@step3")
    return [InjectedFault(int(match[1]), match[2], int(match[3]))]
