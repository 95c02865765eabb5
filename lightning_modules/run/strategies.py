"""`trainer.strategy` from config: a Lightning strategy name, or a mapping for the strategies that
need Python objects (FSDP's wrap policy).

    strategy: ddp                       # any registered name: ddp, deepspeed_stage_2, deepspeed_stage_3, ...
    strategy: {name: fsdp, sharding_strategy: FULL_SHARD, state_dict_type: full}   # FSDP2 (run/fsdp.py)
    strategy: {name: ddp, timeout: 600}   # a rank waits 10 min in a collective for a dead or hung peer
    strategy: {name: ddp, heartbeat: 60}  # a rank silent for 60 s is lost (run/heartbeat.py; default 30)

FSDP is FSDP2 (`fully_shard`, lightning_modules/run/fsdp.py): each transformer block -- the classes
a Hugging Face model lists in `_no_split_modules` that occur more than once (LlamaDecoderLayer,
CLIPEncoderLayer, Qwen2VLDecoderLayer, ...), found on the model instance, so the same config works
for every backbone -- is one unit, the rest of the model the root unit. DeepSpeed is an optional
extra (`pip install 'safety-mirage[deepspeed]'`); without it a deepspeed strategy fails in one line.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from core.distributed import shards_parameters
from core.errors import UserError
from lightning_modules.config.trainer import collective_timeout, heartbeat_grace
from models.precision import strategy_name




def build_strategy(spec: Any, model: nn.Module | None = None, precision: Any = None,
                   deterministic: Any = False) -> Any:
    """A value for `lightning.Trainer(strategy=...)`; `precision` (trainer.precision) resolves a
    DeepSpeed config's "auto" fp16/bf16 blocks; `deterministic` (trainer.deterministic) fixes DDP's buckets."""
    if spec == "ddp" and deterministic:
        spec = {"name": "ddp"}
    if spec == "fsdp":
        return fsdp_strategy({}, model)
    if spec is None or isinstance(spec, str):
        if isinstance(spec, str) and spec.startswith("deepspeed"):
            require_deepspeed(spec)
            from lightning_modules.run.deepspeed_config import deepspeed_strategy

            # Lightning's registered names (deepspeed_stage_3, ...) as our strategy: atomic checkpoint
            # directories, CPU processes; with the arguments Lightning registers for the name.
            if _registered(spec):
                return deepspeed_strategy(dict(_registered(spec)["init_params"]), precision, model)
        return spec if spec is not None else "auto"
    if not isinstance(spec, dict) or "name" not in spec:
        raise UserError(f"trainer.strategy must be a strategy name or a mapping with 'name', got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name")
    if "timeout" in spec:  # seconds a collective waits for the other ranks before this rank stops
        spec["timeout"] = collective_timeout(spec["timeout"])
    spec.pop("heartbeat", None)  # ours, not the strategy's (run/heartbeat.py)
    if name == "fsdp":
        return fsdp_strategy(spec, model)
    if name == "deepspeed":  # {name: deepspeed, config: {...} | file.json}: run/deepspeed_config.py
        require_deepspeed(name)
        from lightning_modules.run.deepspeed_config import deepspeed_strategy

        return deepspeed_strategy(spec, precision, model)
    if name == "ddp":  # e.g. {name: ddp, find_unused_parameters: true, timeout: ...}
        from lightning.pytorch.strategies import DDPStrategy

        if deterministic:
            # DDP re-buckets the gradients by their order of arrival after its first step, so a
            # resumed run's first step sums them in other buckets than the uninterrupted run did:
            # on 3+ ranks the ring all-reduce then adds in another order (1 ulp apart). Looking for
            # unused parameters keeps the first buckets for good (an extra graph walk per step).
            spec.setdefault("find_unused_parameters", True)
        return DDPStrategy(**spec)
    raise UserError(f"unknown trainer.strategy.name '{name}'; choose one of: fsdp, deepspeed, ddp "
                    "(or give a registered Lightning strategy name as a string)")


FSDP_PRECISIONS = ("32-true", "bf16-mixed")  # fp32 shards; bf16-true would cast the shards themselves


def shards_by_config(spec: Any) -> bool:
    """Whether `trainer.strategy` shards the weights (FSDP, DeepSpeed stage 3), read from the config."""
    name = strategy_name(spec)
    if name == "fsdp" or name.startswith("deepspeed_stage_3"):
        return True
    if name == "deepspeed" and isinstance(spec, dict):
        config = spec.get("config") if isinstance(spec.get("config"), dict) else {}
        return 3 in (spec.get("stage"), (config.get("zero_optimization") or {}).get("stage"))
    return False


def check_strategy(cfg) -> None:
    """The strategy settings, and the combinations with other settings that cannot work, refused
    in one line before a run directory is made or a model loaded."""
    spec = cfg.trainer.get("strategy")
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec
    name = strategy_name(spec)
    if isinstance(spec, dict) and "timeout" in spec:
        collective_timeout(spec["timeout"])
    heartbeat_grace(spec)
    if name.startswith("fsdp") and name != "fsdp":
        raise UserError(f"trainer.strategy '{name}' (Lightning's FSDP1) is not supported; allowed: "
                        "fsdp or {name: fsdp, ...} (FSDP2, see lightning_modules/run/fsdp.py)")
    if name == "fsdp":
        from lightning_modules.run.fsdp import FSDP2Strategy

        FSDP2Strategy.parse_options({k: v for k, v in spec.items() if k not in ("name", "timeout")}
                                    if isinstance(spec, dict) else {})
        precision = str(cfg.trainer.get("precision") or "32-true")
        if precision not in FSDP_PRECISIONS and precision not in ("32", "bf16"):
            raise UserError(f"trainer.precision={precision} is not supported with trainer.strategy fsdp "
                            f"(allowed: {', '.join(FSDP_PRECISIONS)})")
    if name.startswith("deepspeed") and optimizer_offload_key(spec):
        check_cpu_adam(optimizer_offload_key(spec))
    if shards_by_config(spec) and cfg.eval.get("probes"):
        raise UserError(f"eval.probes=true cannot run with trainer.strategy {name}: the probes run forwards on "
                        "rank 0 alone and sharded weights need every rank (allowed: eval.probes=false, or an "
                        "unsharded strategy: ddp, deepspeed_stage_2)")


def fsdp_strategy(options: dict, model: nn.Module | None):
    from lightning_modules.run.fsdp import FSDP2Strategy

    return FSDP2Strategy.from_options(options, model)


def gathered_model_weights(trainer, module) -> dict | None:
    """`module.model`'s full weights on CPU, materialised on rank 0 only (the other ranks get an
    empty dict), when the strategy shards them; else None. A collective under FSDP / ZeRO-3: every
    rank must call it. One tensor is gathered at a time, so no rank ever holds the whole model twice."""
    strategy = trainer.strategy
    if not shards_parameters(strategy):
        return None
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        import deepspeed

        state = {}
        for name, tensor in module.model.state_dict(keep_vars=True).items():
            with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else [], modifier_rank=None):
                if trainer.global_rank == 0:
                    state[name] = tensor.detach().cpu().clone()
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict + cpu_offload: each tensor gathered in turn and kept on rank 0 alone (empty elsewhere).
    state = get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _registered(name: str) -> dict:
    from lightning.pytorch.strategies import StrategyRegistry

    return StrategyRegistry[name] if name in StrategyRegistry else {}


def optimizer_offload_key(spec: Any) -> str:
    """The setting by which a deepspeed `trainer.strategy` puts the optimizer in CPU RAM or on NVMe
    ("" if none): a registered name (deepspeed_stage_2_offload), DeepSpeedStrategy's own argument,
    or the DeepSpeed config's block."""
    if isinstance(spec, str):
        return f"trainer.strategy={spec}" if _registered(spec).get("init_params", {}).get("offload_optimizer") else ""
    if not isinstance(spec, dict):
        return ""
    from lightning_modules.run.deepspeed_config import read_config
    from models.precision import offloads_optimizer

    if spec.get("offload_optimizer"):
        return "trainer.strategy.offload_optimizer=true"
    if "config" in spec and offloads_optimizer(read_config(spec["config"])):
        return "trainer.strategy.config.zero_optimization.offload_optimizer"
    return ""


def check_cpu_adam(key: str) -> None:
    """An offloaded optimizer (`key`) is DeepSpeed's CPU Adam (models/precision.optimizer_spec), a C++
    op: installed with DeepSpeed (DS_BUILD_CPU_ADAM=1), or compiled by its first run (a C++ compiler
    and ninja; measured 90 s on 2 cores, then cached under ~/.cache/torch_extensions)."""
    require_deepspeed("deepspeed")
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import is_ninja_available

    if installed_ops.get("cpu_adam"):
        return
    compiler = os.environ.get("CXX", "c++")  # what torch's extension builder calls
    missing = [what for what, found in ((f"C++ compiler '{compiler}'", shutil.which(compiler)),
                                        ("ninja", is_ninja_available())) if not found]
    if missing:
        raise UserError(f"{key} runs DeepSpeed's CPU Adam, a C++ op neither installed nor buildable here (no "
                        f"{' and no '.join(missing)} found): install them (its first run builds it) or remove the "
                        "optimizer offload")


def require_deepspeed(name: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"trainer.strategy '{name}' needs DeepSpeed, which is not installed: "
                        "pip install 'safety-mirage[deepspeed]'")
