"""Distributed helpers that data, metrics and modules share: which rank this is, whether weights are
sharded (every forward a collective), and gathering Python objects from all ranks."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any

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
