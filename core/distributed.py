"""Distributed helpers that data, metrics and modules share: which rank this is, whether weights are
sharded (every forward a collective), and gathering Python objects from all ranks."""

from __future__ import annotations

import contextlib
import gc
import os
from datetime import timedelta
from typing import Any, Optional

import torch


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 as its launcher set it, before torch.distributed
    exists (torchrun: RANK; SLURM: SLURM_PROCID; Lightning's own DDP children: LOCAL_RANK, NODE_RANK)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key]) == 0
    return os.environ.get("LOCAL_RANK", "0") in ("", "0") and os.environ.get("NODE_RANK", "0") in ("", "0")


def gather_objects(items: list) -> list:
    """Every rank's list, concatenated in rank order (the list itself outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(items)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def shards_parameters(strategy: Any) -> bool:
    """Whether the weights are sharded across ranks (FSDP, DeepSpeed ZeRO-3): then every forward is
    a collective, so ranks must run the same number of eval batches and generate in lockstep."""
    if strategy is None:
        return False
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.zero_stage_3)


@contextlib.contextmanager
def root_gathered(model):
    """FSDP2: the root unit's weights (embeddings, projector, norms, head) gathered for the block.
    transformers' `generate` calls submodules before the first forward (`get_image_features`), which
    FSDP2's hooks on the root forward would not gather; the blocks gather themselves."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def accelerator_device(accelerator: str = "auto") -> torch.device:
    """Where a step outside the Trainer runs (the forget-set harvest, the VLM judge): this rank's GPU
    when there is one and the config's `trainer.accelerator` does not ask for the CPU."""
    if torch.cuda.is_available() and str(accelerator) != "cpu":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def free_memory() -> None:
    """Hand a released model's memory back before the next model loads (a judge after the
    generator, one harvest generator after another)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- rank 0 leads, the other ranks serve its generation jobs ------------------------------------------
class RankPool:
    """The processes of a generation command (`evaluate`, the suite, the judge): rank 0 runs the
    command; the other ranks wait for its jobs (`serve`). A job is a picklable object whose
    `run(rank, world)` answers that rank's shard; rank 0 gets every rank's part, in rank order.

    Two gloo groups carry the Python objects: jobs wait on one with a long timeout (rank 0 may judge
    or tabulate for a long while between jobs; a rank 0 that dies closes it at once), parts come back
    on one with `timeout` (a rank that hangs in its shard stops the others after that long)."""

    IDLE = timedelta(days=7)

    def __init__(self, timeout: timedelta):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.idle = dist.new_group(backend="gloo", timeout=self.IDLE)
        self.work = dist.new_group(backend="gloo", timeout=timeout)
        self.busy = False

    def run(self, job) -> list:
        """Rank 0: `job` on every rank; every rank's part, in rank order."""
        import torch.distributed as dist

        self.busy = True  # until every part is back: the other ranks are not listening for jobs
        dist.broadcast_object_list([job], src=0, group=self.idle)
        part = job.run(self.rank, self.world)
        parts: list = [None] * self.world
        dist.gather_object(part, parts, dst=0, group=self.work)
        self.busy = False
        return parts

    def serve(self) -> None:
        """The other ranks: run rank 0's jobs until it says stop (None)."""
        import torch.distributed as dist

        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=0, group=self.idle)
            if box[0] is None:
                return
            dist.gather_object(box[0].run(self.rank, self.world), None, dst=0, group=self.work)

    def stop(self) -> None:
        """Rank 0: the other ranks return from `serve`. Only between jobs (after a failure inside one,
        rank 0 just leaves: the others see its connection close)."""
        import torch.distributed as dist

        if self.busy:
            return

        dist.broadcast_object_list([None], src=0, group=self.idle)


_POOL: Optional[RankPool] = None


def set_rank_pool(pool: Optional[RankPool]) -> None:
    global _POOL
    _POOL = pool


def run_job(job) -> list:
    """Every rank's part of `job` (rank order) on rank 0 of a pool; `[job.run(0, 1)]` without one."""
    return _POOL.run(job) if _POOL is not None else [job.run(0, 1)]


def batch_shard(n_batches: int, rank: int, world: int) -> list[int]:
    """The batches rank `rank` answers: every world-th one. Batches keep the composition a single
    process gives them (the same padding, hence the same greedy answers on any number of ranks)."""
    return list(range(rank, n_batches, world))


def in_rank_pool() -> bool:
    """Whether jobs run on several ranks (rank 0 of a `RankPool`)."""
    return _POOL is not None
