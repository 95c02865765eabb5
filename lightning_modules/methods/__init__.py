"""The alignment methods: one LightningModule each, over a pure loss of `losses/`.

The registry below is the one list of methods: `method.name` in a config, compare's default
method list and the error for an unknown name all read it. Adding a method is a loss in
`losses/`, a short subclass here, a line in `METHODS` and `configs/method/<name>.yaml`
(docs/adding-a-method.md).
"""

from __future__ import annotations

from core.errors import UserError
from lightning_modules.methods.alignment import AlignmentModule
from lightning_modules.methods.ga import GAModule
from lightning_modules.methods.graddiff import GradDiffModule
from lightning_modules.methods.npo import NPOModule
from lightning_modules.methods.rmu import RMUModule
from lightning_modules.methods.sft import SFTModule
from lightning_modules.methods.simnpo import SimNPOModule

METHODS: dict[str, type[AlignmentModule]] = {
    module.name: module for module in (SFTModule, GAModule, GradDiffModule, NPOModule, SimNPOModule, RMUModule)}


def get_method(name: str) -> type[AlignmentModule]:
    """The module class of `method.name`."""
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
