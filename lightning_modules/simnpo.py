"""SimNPO: reference-free, length-normalised NPO (DESIGN §2):
L = -(2/β)·mean_i log σ(β·(nll_i^θ/len_i - δ)) on D_f, + λ·CE(D_r)."""

from __future__ import annotations

import dataclasses

from lightning_modules.base import register_method
from lightning_modules.unlearning import UnlearningModule, UnlearningParams, check
from losses import simnpo_loss


@dataclasses.dataclass
class SimNPOParams(UnlearningParams):
    beta: float = 2.5
    delta: float = 0.0  # margin inside β (the SimNPO paper's γ = β·δ)

    def __post_init__(self):
        super().__post_init__()
        check(self.beta > 0, "beta", self.beta, "must be > 0")


@register_method
class SimNPOModule(UnlearningModule):
    name = "simnpo"
    Params = SimNPOParams

    def loss_terms(self, batch: dict) -> dict:
        nll, n_tokens = self.sequence_nll(batch["forget"])
        loss = simnpo_loss(nll, n_tokens, self.params.beta, self.params.delta)
        forget_ce = nll.sum() / n_tokens.sum().clamp_min(1)
        return self.with_retain(loss, {"simnpo": loss, "forget_ce": forget_ce}, batch)
