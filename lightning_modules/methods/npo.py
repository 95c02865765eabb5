"""Negative preference optimisation:
L = -(2/β)·mean_i log σ(β·(nll_i^θ - nll_i^ref)) on D_f, + λ·CE(D_r).

`normalization` picks what nll is: `sequence_sum` (per-sequence summed NLL; NPO paper,
open-unlearning) or `batch_mean_ce` (batch token-mean CE; the official VLM code). β does not
transfer between them. The reference costs no second model: a per-sample NLL `cache` computed
before the first update (`auto`, LoRA or full fine-tuning), the model with its LoRA `adapter`
disabled, or a `snapshot` of the trainable tensors (a frozen copy).
"""

from __future__ import annotations

import dataclasses

from core.schema import setting
from lightning_modules.methods.unlearning import REFERENCES, UnlearningModule, UnlearningParams
from losses import npo_loss, pooled_ce

NORMALIZATIONS = ("sequence_sum", "batch_mean_ce")


@dataclasses.dataclass
class NPOParams(UnlearningParams):
    beta: float = setting(0.1, "inverse temperature β of the NPO loss", gt=0)
    normalization: str = setting("sequence_sum", "how a sequence's log-ratio is pooled", choices=NORMALIZATIONS)
    reference: str = setting("auto", "auto (= cache) | adapter | cache | snapshot",
                             choices=REFERENCES)


class NPOModule(UnlearningModule):
    name = "npo"
    Params = NPOParams

    def __init__(self, model, processor, cfg, **kwargs):
        super().__init__(model, processor, cfg, **kwargs)
        # The cache costs one forward per forget row before training, then nothing: cheaper than a
        # second (adapter-off) forward every step, so `auto` takes it under LoRA too.
        self.setup_reference(self.params.reference, full_default="cache", lora_default="cache",
                             allowed=("auto", "adapter", "cache", "snapshot"))

    def loss_terms(self, batch: dict) -> dict:
        forget = batch["forget"]
        nll, n_tokens = self.sequence_nll(forget)
        ref_nll = self.reference_sequence_nll(forget)
        forget_ce = pooled_ce(nll, n_tokens)
        if self.params.normalization == "sequence_sum":
            loss = npo_loss(nll, ref_nll, self.params.beta)
        else:
            ref_ce = pooled_ce(ref_nll, n_tokens)
            loss = npo_loss(forget_ce, ref_ce, self.params.beta, normalization="batch_mean_ce")
        return self.with_retain(loss, {"npo": loss, "forget_ce": forget_ce}, batch)
