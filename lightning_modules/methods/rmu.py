"""Representation misdirection for unlearning (RMU):

    L = mse(h_ℓ^θ(x_f), c·u) + α·mse(h_ℓ^θ(x_r), h_ℓ^ref(x_r)) + λ·CE(D_r)

`h_ℓ` is the output hidden state of decoder layer ℓ (0-based, as `model.layers[ℓ]` in the official
code); `u` is a seeded unit vector drawn once and kept as a buffer, so it is saved with every
checkpoint. Only `param_pattern` tensors of `train_layers` (default ℓ-2..ℓ, `mlp.down_proj`, as the
official VLM code) train, plus the projector (`train_projector`, as the official code) and
`extra_params` if set.

ℓ is a depth fraction: `layer: auto` takes `model.rmu_layer` if the model config sets one, else
round(7/32 x the number of decoder layers) -- the official ℓ = 7 (layers 5-7) on LLaVA-1.5-7B's 32 layers,
9 on 13B's 40, 6 on Qwen2-VL-2B's 28, 1 on the 3-layer Mirage World model (its tuned value).

Cost: the forget term and the reference retain activations only need `h_ℓ`, so those
forwards run the decoder with its layer list cut after layer ℓ and keep one position's logits
(`logits_to_keep=1`); the forward itself ends normally, so it is the same under DDP, FSDP2 and
ZeRO-3, whose hooks expect every forward they start to finish. The policy's retain activation is
captured from the same full forward that computes CE(D_r) (truncated as well when λ = 0). The
reference is the model with its adapter disabled (LoRA) or with frozen copies of the few modules
that own trainable tensors swapped in (full fine-tuning), never a second model.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from typing import Literal, Optional, Union

import torch
from torch import nn

from core.errors import UserError
from core.schema import setting
from models.backbone import PROJECTOR, decoder_layers, narrow_trainable
from lightning_modules.methods.unlearning import UnlearningModule, UnlearningParams, check
from losses import make_control_vector, rmu_forget_loss, rmu_retain_loss, token_mean_ce

POSITIONS = ("text", "real", "all")
AUTO_LAYER_FRACTION = 7 / 32  # the official recipe: ℓ = 7 of LLaVA-1.5-7B's 32 decoder layers


def auto_layer(n_layers: int) -> int:
    """RMU's ℓ for a model of `n_layers` decoder layers: the official depth fraction, at least 0."""
    return min(n_layers - 1, max(0, round(AUTO_LAYER_FRACTION * n_layers)))


@dataclasses.dataclass
class RMUParams(UnlearningParams):
    layer: Union[int, Literal["auto"]] = setting("auto", "ℓ, the 0-based decoder layer whose output is steered; "
                                                 "auto: model.rmu_layer, else round(7/32 x decoder layers)", ge=0)
    steering_coeff: float = setting(10.0, "c: norm of the control vector", gt=0)
    alpha: float = setting(1.0, "weight of the retain activation term", ge=0)
    train_layers: Optional[Union[list[int], Literal["all"]]] = setting(
        None, "layers whose param_pattern tensors train (default: ℓ-2..ℓ, those that exist; all: every "
        "parameter the finetune mode trains, as the official LoRA script)", ge=0)
    param_pattern: str = setting(r"mlp\.down_proj\.", "regex on parameter names inside train_layers", regex=True)
    train_projector: bool = setting(False, "also train the projector (the official code does)")
    extra_params: Optional[str] = setting(None, "regex on full parameter names also trained", regex=True)
    positions: str = setting("text", "text: real non-image tokens | real: attention mask | all: every position",
                             choices=POSITIONS)
    control_seed: Optional[int] = setting(None, "seed of u (default: the run seed)")
    reference: str = setting("auto", "auto (adapter under LoRA, else snapshot) | adapter | snapshot",
                             choices=("auto", "adapter", "snapshot"))
    truncate: bool = setting(True, "stop forwards after layer ℓ where only h_ℓ is needed")
    retain_iterator: str = setting("restart", "restart: every epoch updates | once: the official full trainer's "
                                   "retain iterator, never restarted, so no update after the first epoch while "
                                   "the schedule spans trainer.max_epochs (needs alpha > 0)",
                                   choices=("restart", "once"))


@contextmanager
def capture_output(layer: nn.Module):
    """Records the layer's output hidden state in the yielded dict under "h"."""
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        store["h"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def layers_cut(model: nn.Module, layers_name: str, keep: int):
    """`model` whose decoder runs only its first `keep` layers, for the block (the same layer
    modules, so their weights, hooks and shards are those of the model)."""
    parent_name, _, attr = layers_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[:keep]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


class RMUModule(UnlearningModule):
    name = "rmu"
    Params = RMUParams
    AUTO_REFERENCE = ("snapshot", "adapter")  # what reference=auto is under (full fine-tuning, LoRA)

    def __init__(self, model, processor, cfg, **kwargs):
        super().__init__(model, processor, cfg, **kwargs)
        p = self.params
        self.layers_name, layers = decoder_layers(self.model)
        self.layer_index = self.resolve_layer(p, cfg, len(layers))
        check(self.layer_index < len(layers), "layer", self.layer_index,
              f"the model has {len(layers)} decoder layers (0-based)")
        self.layer_module = layers[self.layer_index]
        self.train_layers = self.trained_layers(p, self.layer_index)
        for i in self.train_layers or []:
            check(0 <= i <= self.layer_index, "train_layers", self.train_layers,
                  f"layers must lie in 0..{self.layer_index} (only they shape h_ℓ)")
        self.trained_parameters = self.select_trainable(self.model, p, self.train_layers, self.model_identity["finetune"])
        hidden = self.model.config.get_text_config().hidden_size
        seed = p.control_seed if p.control_seed is not None else int(cfg.seed)
        # A persistent buffer: saved and restored with every checkpoint, moved with the module.
        self.register_buffer("control_vector", make_control_vector(hidden, p.steering_coeff, seed))
        self.setup_reference(p.reference, *self.AUTO_REFERENCE, allowed=("auto", "adapter", "snapshot"))
        check(p.retain_iterator == "restart" or p.alpha > 0, "retain_iterator", p.retain_iterator,
              "the official trainer keeps a retain iterator only when rmu_retain_alpha != 0: set method.alpha > 0")

    @staticmethod
    def trained_layers(p: RMUParams, layer_index: int) -> Optional[list[int]]:
        if p.train_layers == "all":
            return None
        return list(p.train_layers) if p.train_layers is not None else list(
            range(max(0, layer_index - 2), layer_index + 1))

    @staticmethod
    def select_trainable(model, p: RMUParams, layers: Optional[list[int]], finetune: str) -> list[str]:
        """Keep trainable only what the finetune mode trains *and* RMU selects (models.backbone's rule)."""
        extras = [x for x in (p.extra_params, PROJECTOR.pattern if p.train_projector else None) if x]
        # train_layers=all: every in-layer tensor the finetune mode trains (the official LoRA RMU)
        chosen = narrow_trainable(model, layers, p.param_pattern if layers is not None else "", extras)
        if p.train_projector and not any(PROJECTOR.search(n) for n in chosen):
            raise UserError("method.train_projector=true but no projector parameter is trainable "
                            f"(model.finetune={finetune}; under LoRA add the projector "
                            "to model.lora.modules_to_save)")
        if not chosen:
            raise UserError(f"RMU trains nothing: no trainable parameter matches method.param_pattern="
                            f"'{p.param_pattern}' in layers {layers} or method.extra_params="
                            f"{p.extra_params!r} (model.finetune={finetune})")
        return chosen

    @classmethod
    def narrow_for_plan(cls, model, cfg) -> None:
        """The same selection on a model built for the run plan (no module, no data)."""
        p = cls.parse_params(cfg.method)
        index = cls.resolve_layer(p, cfg, len(decoder_layers(model)[1]))
        cls.select_trainable(model, p, cls.trained_layers(p, index), cfg.model.finetune)

    @staticmethod
    def resolve_layer(p: RMUParams, cfg, n_layers: int) -> int:
        """ℓ: method.layer, else model.rmu_layer, else the official depth fraction."""
        if p.layer != "auto":
            return int(p.layer)
        model_layer = cfg.model.get("rmu_layer")
        return int(model_layer) if model_layer is not None else auto_layer(n_layers)

    def setup(self, stage: str) -> None:
        """Under DDP every trainable tensor needs a gradient at every step. With λ = 0 every RMU
        forward stops after layer ℓ, so tensors trained in later layers get none: refused before
        the first step (FSDP2 and DeepSpeed reduce only the gradients that exist)."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if stage != "fit" or not isinstance(strategy, DDPStrategy) or self.params.retain_weight \
                or not self.params.truncate or strategy._ddp_kwargs.get("find_unused_parameters"):
            return
        later = re.compile(rf"(^|\.){re.escape(self.layers_name)}\.(\d+)\.")
        unused = [n for n in self.trained_parameters
                  if (m := later.search(n)) and int(m.group(2)) > self.layer_index]
        if unused:
            raise UserError(f"method.retain_weight=0 with method.truncate=true leaves {unused[0]} (and "
                            f"{len(unused) - 1} more) trained after layer {self.layer_index} without a gradient, "
                            "which DDP refuses; allowed: method.truncate=false, method.retain_weight > 0, or "
                            "trainer.strategy={name: ddp, find_unused_parameters: true}")

    # -- activations --------------------------------------------------------------------------
    def position_mask(self, batch: dict) -> Optional[torch.Tensor]:
        if self.params.positions == "all":
            return None
        mask = batch["attention_mask"].bool()
        image_token = getattr(self.model.config, "image_token_id", None)
        if self.params.positions == "text" and image_token is not None:
            mask = mask & (batch["input_ids"] != image_token)
        return mask

    def hidden_at_layer(self, batch: dict, reference: bool = False) -> torch.Tensor:
        """h_ℓ of the policy (with graph) or of the reference (without), the forward cut after ℓ."""
        forward = self.reference_forward if reference else self.forward_model
        if not self.params.truncate:
            with capture_output(self.layer_module) as store:
                forward(batch)
            return store["h"]
        with capture_output(self.layer_module) as store, layers_cut(self.model, self.layers_name,
                                                                    self.layer_index + 1):
            forward(batch, logits_to_keep=1, use_cache=False)
        return store["h"]

    def loss_terms(self, batch: dict) -> dict:
        p = self.params
        forget, retain = batch["forget"], batch["retain"]
        reduction = "all" if p.positions == "all" else "masked"
        forget_mse = rmu_forget_loss(self.hidden_at_layer(forget), self.control_vector,
                                     self.position_mask(forget), reduction)
        if not p.alpha:  # no retain activation term (the official LoRA recipe): no reference forward
            return self.with_retain(forget_mse, {"forget_mse": forget_mse}, batch)
        retain_ce = None
        if p.retain_weight:  # one full forward gives CE(D_r) and h_ℓ^θ(x_r)
            with capture_output(self.layer_module) as store:
                logits = self.forward_model(retain).logits
            retain_ce, h_retain = token_mean_ce(logits, retain["labels"]), store["h"]
        else:
            h_retain = self.hidden_at_layer(retain)
        retain_mse = rmu_retain_loss(h_retain, self.hidden_at_layer(retain, reference=True),
                                     self.position_mask(retain), reduction)
        loss = forget_mse + p.alpha * retain_mse
        return self.with_retain(loss, {"forget_mse": forget_mse, "retain_mse": retain_mse}, batch,
                                retain_ce=retain_ce)

    def on_train_epoch_end(self) -> None:
        # retain_iterator=once: OPTML-Group/VLM-Safety-Unlearn 1f89239 llava_unlearn_full_trainer.py builds the
        # retain iterator once (:326-328) and never restarts it (the restart is commented out at :489-490), so
        # from the second epoch every step returns 0 with no backward (:499-514): the run's weights are those
        # after epoch 1, its learning rates those of the first epoch of a max_epochs cosine schedule. Stopping
        # here gives the same weights (the schedule was sized for max_epochs in configure_optimizers).
        if self.params.retain_iterator == "once":
            self.trainer.should_stop = True
