"""`trainer.strategy: {name: deepspeed, config: {...}}`: a DeepSpeed config as the official runs wrote
it (configs/trainer/deepspeed_zero*.yaml carry the values of the official scripts/zero2.json,
zero3.json and zero3_offload.json, each cited), with its "auto" values resolved the way the
Hugging Face Trainer resolves them (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig):

- fp16 / bf16 `enabled: auto` -> from trainer.precision (16-mixed / 16-true; bf16-mixed / bf16-true),
  so the config agrees with what Lightning would add itself (lightning/fabric/strategies/deepspeed.py
  `_format_precision_config` writes `bf16: {enabled: true}` only when the config has no `bf16` key);
  Lightning's bf16-mixed with DeepSpeed is DeepSpeed's bf16 mode: 16-bit weights, fp32 masters and
  moments inside the ZeRO optimizer (models/precision.py: nothing is upcast);
- reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold `auto` ->
  hidden², 0.9·hidden², 10·hidden of the language model (HfTrainerDeepSpeedConfig.trainer_config_finalize);
- train_micro_batch_size_per_gpu, train_batch_size, gradient_accumulation_steps, gradient_clipping
  `auto` -> dropped: Lightning sets them from the dataloader's batch sampler (`batch_size`),
  trainer.accumulate_grad_batches and trainer.gradient_clip_val (it refuses a config that sets
  gradient_accumulation_steps);
- an `optimizer` / `scheduler` block is refused: the LightningModule's configure_optimizers owns
  them (DeepSpeed's CPU Adam when the optimizer is offloaded, models/precision.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from core.errors import UserError

LIGHTNING_OWNED = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                   "gradient_clipping")
HIDDEN_SIZED = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                "stage3_param_persistence_threshold": lambda h: 10 * h}


def read_config(value: Any) -> dict:
    """`trainer.strategy.config`: a mapping, or a path to a DeepSpeed JSON file."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"trainer.strategy.config: DeepSpeed config file not found: {path}")
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"trainer.strategy.config: {path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise UserError(f"trainer.strategy.config must be a mapping or a JSON file path, got {value!r}")
    return copy.deepcopy(dict(value))


def hidden_size_of(model) -> Optional[int]:
    """The language model's hidden size (the "auto" bucket sizes are computed from it)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def resolve_config(value: Any, precision: Any, hidden_size: Optional[int]) -> dict:
    """A DeepSpeed config with every "auto" resolved (module doc), ready for DeepSpeedStrategy(config=...)."""
    config = read_config(value)
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(f"trainer.strategy.config.{key}: the LightningModule builds the optimizer and the "
                            "schedule (optim.*); remove this block")
    for key in LIGHTNING_OWNED:
        if config.get(key) == "auto":
            del config[key]
    if "gradient_accumulation_steps" in config:
        raise UserError("trainer.strategy.config.gradient_accumulation_steps: set trainer.accumulate_grad_batches "
                        "(or data.effective_batch_size) instead")
    precision = str(precision if precision is not None else "32-true")
    wants = {"fp16": precision in ("16-mixed", "16-true", "16"), "bf16": precision in ("bf16-mixed", "bf16-true", "bf16")}
    for key, on in wants.items():
        block = config.get(key)
        if isinstance(block, dict) and block.get("enabled") == "auto":
            block["enabled"] = on
        elif isinstance(block, dict) and bool(block.get("enabled")) != on:
            raise UserError(f"trainer.strategy.config.{key}.enabled={block.get('enabled')} contradicts "
                            f"trainer.precision={precision}; set it to auto")
    zero = config.get("zero_optimization") or {}
    for key, rule in HIDDEN_SIZED.items():
        if zero.get(key) == "auto":
            if hidden_size:
                zero[key] = rule(hidden_size)
            else:
                del zero[key]  # DeepSpeed's own default
    leftover = [key for key, v in _flatten(config) if v == "auto"]
    if leftover:
        raise UserError(f"trainer.strategy.config: cannot resolve 'auto' for {', '.join(leftover)}; give a value")
    return config


def _flatten(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def deepspeed_strategy(options: dict, precision: Any, model=None):
    """DeepSpeedStrategy from `trainer.strategy` less `name` (`config:` resolved; other keys are
    DeepSpeedStrategy's own arguments, e.g. stage / offload_optimizer when no config is given)."""
    from lightning_modules.run.checkpointing import AtomicDeepSpeedStrategy as DeepSpeedStrategy  # atomic, guarded dirs

    options = dict(options)
    if "config" in options:
        options["config"] = resolve_config(options["config"], precision, hidden_size_of(model))
    try:
        return DeepSpeedStrategy(**options)
    except TypeError as err:
        raise UserError(f"trainer.strategy (deepspeed): {err}") from err
