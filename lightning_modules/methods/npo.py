"""Negative preference optimisation:
L = -(2/β)·mean_i log σ(β·(nll_i^θ - nll_i^ref)) on D_f, + λ·CE(D_r), and with `retain_npo_alpha`
α > 0 the official code's retain term + α·(2/β)·mean_j log σ(β·(nll_j^θ - nll_j^ref)) on D_r.

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
from losses import npo_loss, npo_retain_loss, pooled_ce

NORMALIZATIONS = ("sequence_sum", "batch_mean_ce")


@dataclasses.dataclass
class NPOParams(UnlearningParams):
    beta: float = setting(0.1, "inverse temperature β of the NPO loss", gt=0)
    normalization: str = setting("sequence_sum", "how a sequence's log-ratio is pooled", choices=NORMALIZATIONS)
    reference: str = setting("auto", "auto (= cache) | adapter | cache | snapshot",
                             choices=REFERENCES)
    retain_npo_alpha: float = setting(0.0, "α of the official retain term α·(2/β)·logσ(β(nll_r − nll_r^ref))",
                                      ge=0)


class NPOModule(UnlearningModule):
    name = "npo"
    Params = NPOParams
    AUTO_REFERENCE = ("cache", "cache")  # what reference=auto is under (full fine-tuning, LoRA)

    def __init__(self, model, processor, cfg, **kwargs):
        super().__init__(model, processor, cfg, **kwargs)
        # The cache costs one forward per forget row before training, then nothing: cheaper than a
        # second (adapter-off) forward every step, so `auto` takes it under LoRA too.
        self.setup_reference(self.params.reference, *self.AUTO_REFERENCE,
                             allowed=("auto", "adapter", "cache", "snapshot"))
        self.needs_retain_reference = bool(self.params.retain_npo_alpha)

    def pooled(self, nll, ref_nll, n_tokens):
        """(policy, reference) as `normalization` pools them."""
        if self.params.normalization == "sequence_sum":
            return nll, ref_nll
        return pooled_ce(nll, n_tokens), pooled_ce(ref_nll, n_tokens)

    def loss_terms(self, batch: dict) -> dict:
        forget, p = batch["forget"], self.params
        nll, n_tokens = self.sequence_nll(forget)
        forget_ce = pooled_ce(nll, n_tokens)
        loss = npo_loss(*self.pooled(nll, self.reference_sequence_nll(forget), n_tokens), p.beta, p.normalization)
        terms = {"npo": loss, "forget_ce": forget_ce}
        retain_ce = None
        if p.retain_npo_alpha:  # one retain forward gives the retain term and CE(D_r)
            retain = batch["retain"]
            r_nll, r_tokens = self.sequence_nll(retain)
            retain_ce = pooled_ce(r_nll, r_tokens)
            r_ref = self.reference_sequence_nll(retain, split="retain")
            terms["retain_npo"] = npo_retain_loss(*self.pooled(r_nll, r_ref, r_tokens), p.beta, p.normalization)
            loss = loss + p.retain_npo_alpha * terms["retain_npo"]
        return self.with_retain(loss, terms, batch, retain_ce=retain_ce)
