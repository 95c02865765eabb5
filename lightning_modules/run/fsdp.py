"""FSDP as FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`.

Why FSDP2 and not Lightning's `FSDPStrategy` (FSDP1): FSDP1 wraps modules once per trainer stage,
so a second stage (validate, then fit, then test) finds the blocks wrapped and leaves the root's
weights as 1-D shards; and every call into a submodule outside the root forward (NPO's reference
pass, RMU's truncated forward and frozen reference) breaks its state machine. FSDP2 shards each
parameter in place (a DTensor), keeps the module tree and its names, and runs on CPU processes
(gloo) too, so the tests run it.

    strategy: {name: fsdp, sharding_strategy: FULL_SHARD, state_dict_type: full, activation_checkpointing: false}

- `sharding_strategy`: FULL_SHARD (weights gathered per block for forward and again for backward,
  ZeRO-3-like) or SHARD_GRAD_OP (gathered weights kept from forward to backward,
  `reshard_after_forward=False`, ZeRO-2-like: more memory, less communication);
- `state_dict_type`: full (rank 0 writes one consolidated checkpoint file through the run's
  checkpoint IO, as on one process) or sharded (each rank writes its shard into a checkpoint
  directory: torch.distributed.checkpoint);
- `activation_checkpointing`: recompute each block in backward (transformers' gradient
  checkpointing, non-reentrant, which keeps parameter names);
- `timeout`: seconds a collective waits for the other ranks;
- `heartbeat`: seconds a rank may go silent before the others name it lost (run/heartbeat.py).

Numerics: the sharded parameters are fp32 (the model is cast before sharding), so the optimizer
updates fp32 values; under `bf16-mixed` the gathered compute copies are bf16
(`MixedPrecisionPolicy(param_dtype=bf16)`) and gradients are reduced in fp32.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.schema import reject_unknown
from lightning_modules.run.checkpointing import AtomicModelParallelStrategy

SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}  # -> fully_shard(reshard_after_forward=...)
STATE_DICT_TYPES = ("full", "sharded")
FSDP_KEYS = ("sharding_strategy", "state_dict_type", "activation_checkpointing", "cpu_offload", "timeout", "heartbeat")
COMPUTE_DTYPE = {"bf16-mixed": torch.bfloat16}  # Lightning's precision -> FSDP2's gathered parameter dtype


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The repeated block classes of a HF model (its `_no_split_modules` that occur twice or more)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    counts = Counter(type(m) for m in model.modules() if type(m).__name__ in names)
    return {cls for cls, n in counts.items() if n > 1}


def _choice(key: str, value: Any, allowed) -> Any:
    if value not in allowed:
        raise UserError(f"invalid value for config key 'trainer.strategy.{key}': {value!r} "
                        f"(allowed: {', '.join(map(str, allowed))})")
    return value


class FSDP2Strategy(AtomicModelParallelStrategy):
    """`ModelParallelStrategy` with a pure data-parallel mesh (every process one FSDP shard), its
    sharded checkpoints atomic and guarded (run/checkpointing.py), and the
    sharding itself (`shard_module`, which `AlignmentModule.configure_model` calls)."""

    strategy_name = "fsdp2"

    def __init__(self, blocks: set[type[nn.Module]], reshard_after_forward: bool = True,
                 activation_checkpointing: bool = False, state_dict_type: str = "full", **kwargs):
        super().__init__(save_distributed_checkpoint=state_dict_type == "sharded", **kwargs)
        self.blocks = blocks
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing

    @staticmethod
    def parse_options(options: dict) -> dict:
        """`trainer.strategy` (less `name`) as this class's keyword arguments, checked without a model."""
        reject_unknown("trainer.strategy", sorted(options), FSDP_KEYS, "for fsdp")
        options = dict(options)
        options.pop("heartbeat", None)  # the ranks' heartbeat (run/heartbeat.py), not FSDP's
        sharding = _choice("sharding_strategy", options.pop("sharding_strategy", "FULL_SHARD"), SHARDING)
        state_dict_type = _choice("state_dict_type", options.pop("state_dict_type", "full"), STATE_DICT_TYPES)
        if options.pop("cpu_offload", False):
            raise UserError("trainer.strategy.cpu_offload=true is not supported for fsdp (Lightning moves the "
                            "FSDP2 shards to the GPU); allowed: false. For weights in CPU RAM use "
                            "trainer=deepspeed_zero3 with offload")
        checkpointing = _choice("activation_checkpointing", options.pop("activation_checkpointing", False),
                                (True, False))
        return {"reshard_after_forward": SHARDING[sharding], "activation_checkpointing": checkpointing,
                "state_dict_type": state_dict_type, **options}

    @classmethod
    def from_options(cls, options: dict, model: nn.Module | None) -> "FSDP2Strategy":
        kwargs = cls.parse_options(options)
        blocks = transformer_block_classes(model) if model is not None else set()
        if not blocks:
            raise UserError("trainer.strategy fsdp: the model lists no repeated `_no_split_modules` block to shard")
        return cls(blocks, **kwargs)

    def setup_environment(self) -> None:
        # Lightning's "auto" mesh is tensor-parallel inside a node: here every process is a data-parallel shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def mixed_precision(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        return MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPE.get(precision), reduce_dtype=torch.float32)

    def shard_module(self, module) -> None:
        """fully_shard every transformer block of `module.model`, then the model itself (the root
        unit: embeddings, projector, norms, head). Lightning calls `configure_model` at every stage
        (fit, then test); a model already sharded is left as it is (fully_shard twice raises)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        model = module.model
        if isinstance(model, FSDPModule):
            return
        if self.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.float()  # fp32 shards: the optimizer updates fp32 values; compute dtype is the policy's
        options = {"mesh": self.device_mesh["data_parallel"], "reshard_after_forward": self.reshard_after_forward,
                   "mp_policy": self.mixed_precision()}
        for block in [m for m in model.modules() if type(m) in self.blocks]:
            fully_shard(block, **options)
        fully_shard(model, **options)
        # FSDP2 picks its root at the first forward; transformers' `generate` calls the vision tower
        # before any root forward (`get_image_features`), which would make a vision block a root.
        model._get_fsdp_state()._lazy_init()
