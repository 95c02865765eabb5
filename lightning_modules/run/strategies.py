"""`trainer.strategy` from config: a Lightning strategy name, or a mapping for the strategies that
need Python objects (FSDP's wrap policy).

    strategy: ddp                       # any registered name: ddp, deepspeed_stage_2, deepspeed_stage_3, ...
    strategy: {name: fsdp, sharding_strategy: FULL_SHARD, state_dict_type: full}
    strategy: {name: ddp, timeout: 600}   # a rank waits 10 min in a collective for a dead or hung peer

FSDP wraps each transformer block: the classes a Hugging Face model lists in `_no_split_modules`
that occur more than once (LlamaDecoderLayer, CLIPEncoderLayer, Qwen2VLDecoderLayer, ...), found
on the model instance, so the same config works for every backbone. DeepSpeed is an optional
extra (`pip install 'safety-mirage[deepspeed]'`); without it a deepspeed strategy fails in one line.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from datetime import timedelta
from typing import Any

from torch import nn

from core.distributed import shards_parameters
from core.errors import UserError
from core.schema import reject_unknown

FSDP_KEYS = ("sharding_strategy", "state_dict_type", "cpu_offload", "activation_checkpointing", "limit_all_gathers",
             "timeout")


def collective_timeout(seconds: Any) -> timedelta:
    """`trainer.strategy.timeout` (seconds): how long a rank waits in a collective for a rank that
    died or hangs before it stops with a line of its own (torch's default: 30 min, NCCL 10 min)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise UserError(f"invalid value for config key 'trainer.strategy.timeout': {seconds!r} "
                        "(allowed: a number of seconds > 0)")
    return timedelta(seconds=seconds)


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The repeated block classes of a HF model (its `_no_split_modules` that occur twice or more)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    counts = Counter(type(m) for m in model.modules() if type(m).__name__ in names)
    return {cls for cls, n in counts.items() if n > 1}


def build_strategy(spec: Any, model: nn.Module | None = None, precision: Any = None) -> Any:
    """A value for `lightning.Trainer(strategy=...)`; `precision` (trainer.precision) resolves a
    DeepSpeed config's "auto" fp16/bf16 blocks."""
    if spec is None or isinstance(spec, str):
        if isinstance(spec, str) and spec.startswith("deepspeed"):
            require_deepspeed(spec)
        return spec if spec is not None else "auto"
    if not isinstance(spec, dict) or "name" not in spec:
        raise UserError(f"trainer.strategy must be a strategy name or a mapping with 'name', got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name")
    if "timeout" in spec:  # seconds a collective waits for the other ranks before this rank stops
        spec["timeout"] = collective_timeout(spec["timeout"])
    if name == "fsdp":
        return fsdp_strategy(spec, model)
    if name == "deepspeed":  # {name: deepspeed, config: {...} | file.json}: run/deepspeed_config.py
        require_deepspeed(name)
        from lightning_modules.run.deepspeed_config import deepspeed_strategy

        return deepspeed_strategy(spec, precision, model)
    if name == "ddp":  # e.g. {name: ddp, find_unused_parameters: true, timeout: ...}
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**spec)
    raise UserError(f"unknown trainer.strategy.name '{name}'; choose one of: fsdp, deepspeed, ddp "
                    "(or give a registered Lightning strategy name as a string)")


def fsdp_strategy(options: dict, model: nn.Module | None):
    from lightning.pytorch.strategies import FSDPStrategy

    reject_unknown("trainer.strategy", sorted(options), FSDP_KEYS, "for fsdp")
    blocks = transformer_block_classes(model) if model is not None else set()
    if not blocks:
        raise UserError("trainer.strategy fsdp: the model lists no repeated `_no_split_modules` block to wrap")
    checkpointing = bool(options.pop("activation_checkpointing", False))
    return FSDPStrategy(auto_wrap_policy=blocks, activation_checkpointing_policy=blocks if checkpointing else None,
                        **options)




def gathered_model_weights(trainer, module) -> dict | None:
    """`module.model`'s full weights (on rank 0; others get an empty dict) when the strategy shards
    them, else None. A collective under FSDP / ZeRO-3: every rank must call it."""
    strategy = trainer.strategy
    if not shards_parameters(strategy):
        return None
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.model.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def require_deepspeed(name: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"trainer.strategy '{name}' needs DeepSpeed, which is not installed: "
                        "pip install 'safety-mirage[deepspeed]'")
