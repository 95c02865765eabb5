"""Gradient difference: L = -γ·CE(D_f) + α·CE(D_r) [+ λ·CE(D_r)]. α is the method's own
retain weight; λ (default 0) is the retain term every unlearning method carries, kept for
uniformity: the two add up."""

from __future__ import annotations

import dataclasses

from core.schema import setting
from lightning_modules.methods.unlearning import UnlearningModule, UnlearningParams
from losses import graddiff_loss


@dataclasses.dataclass
class GradDiffParams(UnlearningParams):
    gamma: float = setting(1.0, "weight of the forget ascent", gt=0)
    alpha: float = setting(1.0, "weight of the retain descent", ge=0)
    retain_weight: float = setting(0.0, "λ of λ·CE(D_r)", ge=0)


class GradDiffModule(UnlearningModule):
    name = "graddiff"
    Params = GradDiffParams

    def loss_terms(self, batch: dict) -> dict:
        forget_ce, retain_ce = self.ce(batch["forget"]), self.ce(batch["retain"])
        loss = graddiff_loss(forget_ce, retain_ce, gamma=self.params.gamma, alpha=self.params.alpha)
        return self.with_retain(loss, {"forget_ce": forget_ce}, batch, retain_ce=retain_ce)
