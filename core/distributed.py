"""Distributed helpers that data, metrics and modules share: which rank this is, whether weights are
sharded (every forward a collective), and gathering Python objects from all ranks."""

from __future__ import annotations

from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
