"""Which value each trainable tensor is updated against: the one home of the numerics of a run.

bf16 keeps 8 significant bits: next to a weight of 0.02 the neighbouring bf16 values are ~1.2e-4
apart, so an AdamW step of ~lr (5e-7 for the official NPO, 1e-6 for RMU) applied to a bf16 weight
rounds back to the same weight (the "stale weights" problem, Gopher paper appendix C2). Lightning's
`bf16-mixed` only turns autocast on: it keeps whatever dtype the weights were loaded in. So every
run takes one of these update paths (`optim.master_weights`, checked when the config is loaded):

- fp32 (default): the trainable tensors (peft's `modules_to_save` copies included) are held in fp32,
  frozen ones keep `model.dtype`; forward and backward run under autocast (trainer.precision
  bf16-mixed / 16-mixed). Under DeepSpeed and FSDP the strategy keeps fp32 masters itself
  (`strategy_keeps_masters`): DeepSpeed's bf16 mode holds fp32 master weights and moments inside its
  ZeRO optimizer, FSDP shards fp32 parameters and computes in bf16; nothing is upcast here.
- kahan: weights stay bf16, torch-optimi's AdamW with Kahan summation carries each update's
  rounding error to the next step (`pip install 'safety-mirage[optimi]'`). For one GPU where fp32
  trainable tensors do not fit.
- none: plain AdamW on the weights at their own dtype; only when asked for by name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from core.errors import UserError

MASTER_WEIGHTS = ("fp32", "kahan", "none")
LOW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16", "16")  # Lightning: autocast, weights kept as loaded
CAST_PRECISIONS = ("bf16-true", "16-true")  # Lightning casts the whole module to 16 bits
OPTIMI_HINT = "pip install 'safety-mirage[optimi]'"


def strategy_name(strategy: Any) -> str:
    """`trainer.strategy` (a name or a mapping with `name`) as a lower-case name ('' for none)."""
    if isinstance(strategy, dict) or hasattr(strategy, "get"):
        strategy = strategy.get("name", "")
    return str(strategy or "").lower()


def strategy_keeps_masters(cfg) -> bool:
    """Whether the run's strategy keeps fp32 master weights itself (DeepSpeed's bf16 mode; FSDP's fp32
    sharded parameters with a bf16 compute policy), so trainable tensors must not be upcast here."""
    name = strategy_name((cfg.get("trainer") or {}).get("strategy"))
    return name.startswith("deepspeed") or "fsdp" in name or name == "model_parallel"


@dataclass(frozen=True)
class UpdatePath:
    name: str  # fp32 | kahan | none | strategy
    text: str  # what the plan prints

    @property
    def upcasts(self) -> bool:
        return self.name == "fp32"


def update_path(model_dtype: str, precision: Any, master_weights: str, strategy: Any) -> UpdatePath:
    """The update path of a run, or a UserError naming the setting when a 16-bit trainable weight
    would be updated by a plain optimizer without being asked for (optim.master_weights=none)."""
    precision = str(precision if precision is not None else "32-true")
    name = strategy_name(strategy)
    if master_weights not in MASTER_WEIGHTS:
        raise UserError(f"invalid value for config key 'optim.master_weights': {master_weights!r} "
                        f"(allowed: {', '.join(MASTER_WEIGHTS)})")
    low = model_dtype in LOW_DTYPES or precision in CAST_PRECISIONS
    if name.startswith("deepspeed") or "fsdp" in name or name == "model_parallel":
        kind = "DeepSpeed" if name.startswith("deepspeed") else "FSDP"
        if master_weights != "fp32":
            raise UserError(f"optim.master_weights={master_weights} with trainer.strategy={name}: {kind} keeps fp32 "
                            "master weights itself; use optim.master_weights=fp32 (the default)")
        if kind == "DeepSpeed" and model_dtype in LOW_DTYPES and precision not in AUTOCAST_PRECISIONS + CAST_PRECISIONS:
            raise UserError(f"model.dtype={model_dtype} with trainer.strategy={name} and trainer.precision={precision}: "
                            "DeepSpeed would run its fp32 optimizer on 16-bit weights; set trainer.precision=bf16-mixed")
        if kind == "DeepSpeed":
            return UpdatePath("strategy", "DeepSpeed bf16/fp16 mode: fp32 master weights and moments inside the ZeRO "
                              "optimizer, 16-bit weights and gradients" if precision != "32-true" and precision != "32"
                              else "DeepSpeed fp32: weights, gradients and moments in fp32")
        return UpdatePath("strategy", "FSDP: fp32 sharded parameters and moments, 16-bit compute (mixed-precision policy)")
    if master_weights == "none":
        return UpdatePath("none", "plain AdamW on the weights at their own dtype (optim.master_weights=none"
                          + (": 16-bit updates below half a spacing are lost)" if low else ")"))
    if master_weights == "kahan":
        if not low:
            raise UserError(f"optim.master_weights=kahan is for 16-bit weights, but model.dtype={model_dtype} and "
                            f"trainer.precision={precision} keep them in fp32; use optim.master_weights=fp32")
        return UpdatePath("kahan", "16-bit weights and moments, torch-optimi AdamW with Kahan-summed updates")
    if precision in CAST_PRECISIONS:
        raise UserError(f"trainer.precision={precision} casts every weight to 16 bits, so AdamW would update them in "
                        "16 bits; use trainer.precision=bf16-mixed (fp32 trainable weights), optim.master_weights=kahan, "
                        "or optim.master_weights=none to accept it")
    if model_dtype == "float16" and precision not in AUTOCAST_PRECISIONS:
        raise UserError(f"model.dtype=float16 with fp32 trainable weights (optim.master_weights=fp32) needs "
                        f"trainer.precision=16-mixed (fp16 autocast with loss scaling), not {precision}")
    if model_dtype in LOW_DTYPES and precision not in AUTOCAST_PRECISIONS:
        # Handled, not refused: the module runs its steps and generation under bf16 autocast itself
        # (compute_context), which is what bf16-mixed would do.
        return UpdatePath("fp32", f"fp32 master: trainable tensors in fp32, frozen ones in {model_dtype}, compute under "
                          f"bf16 autocast (the module's own: trainer.precision={precision} has none)")
    if model_dtype in LOW_DTYPES:
        return UpdatePath("fp32", f"fp32 master: trainable tensors in fp32, frozen ones in {model_dtype}, compute under "
                          f"{precision} autocast")
    return UpdatePath("fp32", "fp32 weights" + (" (model.dtype=auto: trainable tensors upcast to fp32 if "
                                                "the checkpoint is 16-bit)" if model_dtype == "auto" else ""))


def run_update_path(cfg) -> UpdatePath:
    """`update_path` of a run config."""
    trainer = cfg.get("trainer") or {}
    return update_path(str(cfg.model.dtype), trainer.get("precision"), str(cfg.optim.get("master_weights", "fp32")),
                       trainer.get("strategy"))


def upcast_trainable(model: torch.nn.Module) -> int:
    """Trainable floating tensors (parameters with requires_grad) to fp32, in place; the count.
    Frozen tensors keep their dtype."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            count += 1
    return count


def apply_master_weights(model: torch.nn.Module, cfg) -> UpdatePath:
    """The run's update path applied to a built model: trainable tensors upcast on the fp32 path
    (unless the strategy keeps masters itself). A checkpoint loaded at `model.dtype=auto` in 16 bits
    without autocast is refused here, before any step."""
    path = run_update_path(cfg)
    if path.upcasts and not strategy_keeps_masters(cfg) and upcast_trainable(model):
        precision = str((cfg.get("trainer") or {}).get("precision") or "32-true")
        if low_precision_dtype(model) == torch.float16 and precision not in AUTOCAST_PRECISIONS:
            raise UserError(f"the model loaded in float16 (model.dtype={cfg.model.dtype}) with fp32 trainable weights "
                            f"needs trainer.precision=16-mixed (loss scaling), not {precision}")
    return path


def low_precision_dtype(model: torch.nn.Module) -> Optional[torch.dtype]:
    """The 16-bit dtype of a model whose parameters mix fp32 and 16 bits (fp32 masters), else None."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = dtypes & {torch.bfloat16, torch.float16}
    return next(iter(low)) if low and torch.float32 in dtypes else None


def compute_context(model: torch.nn.Module, device: torch.device | str):
    """Autocast for a model that mixes fp32 masters with 16-bit frozen weights wherever Lightning's
    precision plugin gives none (trainer.precision=32 with model.dtype=bfloat16, a reference pass in
    on_fit_start, the knowledge probes); a no-op when autocast is on or the dtypes agree."""
    dtype = low_precision_dtype(model)
    kind = torch.device(device).type
    if dtype is None or torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=dtype)


def offloads_optimizer(ds_config: Optional[dict]) -> bool:
    """Whether a DeepSpeed config puts the optimizer state in CPU RAM or on NVMe (ZeRO-Offload)."""
    offload = ((ds_config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def optimizer_spec(optim_cfg, path: str, *, ds_offload: bool = False, fused: bool = False) -> tuple[type, dict]:
    """(optimizer class, keyword arguments) for the update path: torch AdamW (fused on CUDA),
    torch-optimi's Kahan-summed AdamW, or DeepSpeed's CPU Adam when DeepSpeed offloads the optimizer
    (it refuses a torch optimizer there unless zero_force_ds_cpu_optimizer is false)."""
    kwargs = dict(lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, betas=tuple(optim_cfg.betas))
    if ds_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam, {**kwargs, "adamw_mode": True}
    if path == "kahan":
        try:
            import optimi
        except ImportError as err:
            raise UserError(f"optim.master_weights=kahan needs torch-optimi, which is not installed: {OPTIMI_HINT}") from err
        # eps as torch's AdamW; decouple_lr=False: weight decay scaled by lr, as torch's AdamW
        # foreach off: one tensor's temporaries at a time (the point of this path is fitting one GPU)
        return optimi.AdamW, {**kwargs, "eps": 1e-8, "kahan_sum": True, "decouple_lr": False, "foreach": False}
    return torch.optim.AdamW, {**kwargs, **({"fused": True} if fused else {})}
