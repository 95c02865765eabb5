"""The optimizer's parameter groups: every trainable tensor at `optim.lr`, except the projector's at
`optim.projector_lr` when it is set -- LLaVA's `--mm_projector_lr` (haotian-liu/LLaVA c121f04
llava/train/llava_trainer.py:165-195 `create_optimizer`: the projector's parameters in groups of their own with
`lr = mm_projector_lr`; scripts/v1_5/finetune_task_lora.sh:4 sets 2e-5 beside the adapters' 2e-4).
The schedule scales every group by the same factor, so each keeps its own peak."""

from __future__ import annotations

from core.errors import UserError
from models.backbone import PROJECTOR

PROJECTOR_GROUP = "projector"


def param_groups(model, optim_cfg) -> list[dict]:
    """AdamW parameter groups of `model`'s trainable tensors (a group without "lr" takes optim.lr)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("no trainable parameters (check model.finetune and the method's parameter pattern)")
    lr = optim_cfg.get("projector_lr")
    if lr is None:
        return [{"params": [p for _, p in named]}]
    projector = [p for n, p in named if PROJECTOR.search(n)]
    if not projector:
        raise UserError(f"optim.projector_lr={lr} but no projector parameter trains (model.finetune=lora: add the "
                        "projector to model.lora.modules_to_save)")
    rest = [p for n, p in named if not PROJECTOR.search(n)]
    return ([{"params": rest}] if rest else []) + [{"params": projector, "lr": float(lr), "name": PROJECTOR_GROUP}]


def group_lr(group: dict, optim_cfg) -> float:
    """The peak learning rate a group of `param_groups` is configured with (what a resume restores)."""
    if group.get("name") == PROJECTOR_GROUP and optim_cfg.get("projector_lr") is not None:
        return float(optim_cfg.projector_lr)
    return float(optim_cfg.lr)
