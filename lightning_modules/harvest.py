"""Harvest the forget set from the base model itself, as the official pipeline does:
ask the base model the unsafe training queries, keep the answers that the run's judge marks as
harmful compliance (not refused, and harmful), and cache them as a VLGuard-format file.

    python -m lightning_modules.harvest --config configs/experiment/mirage_npo.yaml [key=value ...]

`data.forget_retain.forget_source=harvest` runs the same step inside `fit` (before any update;
the cache makes it a one-off). On several devices (`trainer.devices=N`; on the CPU
`trainer.accelerator=cpu trainer.strategy=ddp` starts N gloo processes) every rank builds the run and
answers its shard of the queries; the forget file is the one a single process writes.
"""

from __future__ import annotations

import lightning as L

from core.errors import UserError, cli_main
from lightning_modules.config.loading import config_cli
from lightning_modules.methods import get_method
from lightning_modules.run.assembly import build_run
from lightning_modules.run.ranks import on_ranks


def harvest(cfg) -> None:
    """Build the run's forget set by harvesting (or reuse the cache) and stop before any training."""
    if not hasattr(get_method(cfg.method.name).datamodule_class, "build_forget_retain"):
        raise UserError(f"method '{cfg.method.name}' does not train on forget/retain data")
    cfg.data.forget_retain.forget_source = "harvest"

    def assemble() -> None:
        L.seed_everything(cfg.seed, verbose=False)  # as fit: the same model (and cache key) on every rank
        build_run(cfg)  # assembly harvests (or reuses the cache) before anything trains

    on_ranks(cfg, assemble, lead=False)


@cli_main
def main(argv: list[str]) -> None:
    config_cli(argv, "python -m lightning_modules.harvest", __doc__.splitlines()[0],
               "configs/experiment/mirage_npo.yaml", harvest)


if __name__ == "__main__":
    main()
