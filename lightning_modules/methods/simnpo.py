"""SimNPO: reference-free, length-normalised NPO:
L = -(2/β)·mean_i log σ(β·(nll_i^θ/len_i - δ)) on D_f, + λ·CE(D_r)."""

from __future__ import annotations

import dataclasses

from core.schema import setting
from lightning_modules.methods.unlearning import UnlearningModule, UnlearningParams
from losses import pooled_ce, simnpo_loss


@dataclasses.dataclass
class SimNPOParams(UnlearningParams):
    beta: float = setting(2.5, "inverse temperature β", gt=0)
    delta: float = setting(0.0, "margin inside β (the SimNPO paper's γ = β·δ)")


class SimNPOModule(UnlearningModule):
    name = "simnpo"
    Params = SimNPOParams

    def loss_terms(self, batch: dict) -> dict:
        nll, n_tokens = self.sequence_nll(batch["forget"])
        loss = simnpo_loss(nll, n_tokens, self.params.beta, self.params.delta)
        forget_ce = pooled_ce(nll, n_tokens)
        return self.with_retain(loss, {"simnpo": loss, "forget_ce": forget_ce}, batch)
