"""Supervised safety fine-tuning: response-only cross-entropy on the safety set (refusals for
unsafe queries, answers for safe ones), optionally mixed with general data (`data.general_ratio`)."""

from __future__ import annotations

import dataclasses

from lightning_modules.methods.alignment import AlignmentModule, MethodParams
from losses import token_mean_ce


@dataclasses.dataclass
class SFTParams(MethodParams):
    pass


class SFTModule(AlignmentModule):
    name = "sft"
    Params = SFTParams

    def loss_terms(self, batch: dict) -> dict:
        logits = self.forward_model(batch).logits
        ce = token_mean_ce(logits, batch["labels"])
        return {"loss": ce, "ce": ce}
