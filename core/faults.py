"""A fault planted on one rank, for the tests of what a fault leaves behind (nothing happens while
the variable is unset; it is for tests, unset it otherwise):

    SAFETY_MIRAGE_FAULT=rank<R>:<raise|kill|oom>@<stage><N>

- stage `step`: at the start of fit's training step N (`trainer.global_step`, so a resumed run
  counts on from its checkpoint; run/fault_injection.py);
- stage `answer`, `judge`, `harvest`: before the batch N (from 0) that rank R starts, in this
  process, answering queries (evaluate, the suite), judging with the VLM judge, or harvesting the
  forget set.

The fault: `raise` a RuntimeError (a bug on that rank), `kill` the rank with SIGKILL (the kernel's
OOM killer, a lost node), `oom` a raised `torch.OutOfMemoryError` (the allocator on a GPU).
E.g. `rank1:kill@step3`, `rank2:oom@judge0`. A malformed value stops any command at load, in one line.
"""

from __future__ import annotations

import os
import re
import signal
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from core.errors import UserError

FAULT_ENV = "SAFETY_MIRAGE_FAULT"
STAGES = ("step", "answer", "judge", "harvest")
_SPEC = re.compile(rf"rank(\d+):(raise|kill|oom)@({'|'.join(STAGES)})(\d+)")


@dataclass(frozen=True)
class PlantedFault:
    rank: int
    kind: str  # raise | kill | oom
    stage: str  # one of STAGES
    index: int  # the step, or the rank's batch of that stage

    def fire(self) -> None:
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        where = f"step {self.index}" if self.stage == "step" else f"{self.stage} batch {self.index}"
        if self.kind == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        raise RuntimeError(f"injected fault at {where}")


def planted_fault() -> Optional[PlantedFault]:
    """The fault `SAFETY_MIRAGE_FAULT` plants (None when unset); a malformed value is a UserError."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise UserError(f"{FAULT_ENV}={spec!r} is not a fault: give rank<R>:<raise|kill|oom>@<{'|'.join(STAGES)}><N>, "
                        "e.g. rank1:kill@step3 or rank2:oom@judge0")
    return PlantedFault(int(match[1]), match[2], match[3], int(match[4]))


_STARTED: Counter = Counter()  # batches this process has started, by stage


def fault_point(stage: str, rank: int) -> None:
    """A batch of `stage` starts on `rank`: the planted fault fires here if it names this one."""
    index = _STARTED[stage]
    _STARTED[stage] += 1
    fault = planted_fault()
    if fault is not None and (fault.stage, fault.rank, fault.index) == (stage, rank, index):
        fault.fire()
