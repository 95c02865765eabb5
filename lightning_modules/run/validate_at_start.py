"""The step-0 validation, run inside `trainer.fit`.

A separate `trainer.validate` before `trainer.fit` sets the strategy up twice: two DeepSpeed engines
over one model, FSDP sharding the model twice, DDP wrapping it twice. Here the validation loop runs
once at the start of training, the way Lightning runs it between training batches, with the
strategy fit set up: its metrics are logged at step 0 exactly as a validation at step 0 would be.
"""

from __future__ import annotations

import lightning as L


class ValidateAtStart(L.Callback):
    """Runs the whole validation loop once before the first training step of a fresh run
    (`eval.val_at_start`; never added on resume)."""

    def __init__(self):
        self.done = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done or trainer.global_step != 0 or not trainer.enable_validation:
            return
        self.done = True
        # As Lightning's training epoch loop runs a validation between batches (on_advance_end).
        logs = trainer._logger_connector
        first_loop_iter = logs._first_loop_iter
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        logs._first_loop_iter = first_loop_iter
