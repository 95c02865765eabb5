"""Gradient ascent: L = -CE(D_f) [+ λ·CE(D_r)]. Unbounded below: without the retain
term it diverges, and the divergence guard stops the run at the first non-finite loss."""

from __future__ import annotations

import dataclasses

from core.schema import setting
from lightning_modules.methods.unlearning import UnlearningModule, UnlearningParams
from losses import ga_loss


@dataclasses.dataclass
class GAParams(UnlearningParams):
    retain_weight: float = setting(0.0, "λ of λ·CE(D_r); 0: pure gradient ascent", ge=0)


class GAModule(UnlearningModule):
    name = "ga"
    Params = GAParams

    def loss_terms(self, batch: dict) -> dict:
        forget_ce = self.ce(batch["forget"])
        return self.with_retain(ga_loss(forget_ce), {"forget_ce": forget_ce}, batch)
