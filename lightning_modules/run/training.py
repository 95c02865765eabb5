"""One run of `fit`: fit (validating at step 0 inside it), save the model, test, write results, probe, export."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from core.errors import UserError
from core.files import atomic_write, storage_fault
from core.parent_watch import launching, orphan_note
from core.records import strict_json
from lightning_modules.analysis.probes import run_probes
from lightning_modules.config.loading import to_yaml
from lightning_modules.config.trainer import check_accelerator_exists, heartbeat_grace
from lightning_modules.methods.alignment import TrainingDiverged
from lightning_modules.run.checkpointing import saved_step
from lightning_modules.run.ranks import ChildWatcher, WatchRanks, adopt_at_launch, rank_faults as ranks_faults
from lightning_modules.run.export import finish_export, save_model
from lightning_modules.run.loggers import log_hparams_summary as log_to_loggers
from lightning_modules.run.strategies import check_strategy, gathered_model_weights
from lightning_modules.run.run_dir import (RUN_DIR_ENV, archive_finished_run, is_finished, prepare_run_dir,
                                           release_run_dir)
from lightning_modules.run.identity import check_layout, remember_base
from lightning_modules.run.resume import check_checkpoint_fits, resolve_checkpoint
from lightning_modules.run.assembly import build_run, build_trainer, scale_hparams
from lightning_modules.run.plan import print_plan
from lightning_modules.run.validate_at_start import ValidateAtStart


RESULT_COLUMNS = ["asr", "refusal_rate", "ir", "accuracy", "relevant", "n"]


def log_hparams_summary(trainer: L.Trainer, module, scale: dict) -> None:
    """TensorBoard's HParams view: the config + scale against the final val/test metrics."""
    metrics = {f"hp/{k}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
    if metrics:
        log_to_loggers(trainer.loggers, {**module.hparams, "scale": scale}, metrics)


def results_table(results: dict[str, dict[str, float]]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(results, orient="index").reindex(columns=RESULT_COLUMNS)
    table.index.name = "eval_set"
    return table


def write_results(run_dir: Path, module) -> pd.DataFrame:
    """results.csv / results.json / samples.jsonl, each written atomically: a full disk ends in one
    line and leaves any earlier file whole. JSON never holds NaN or Infinity."""
    table = results_table(module.test_results)
    atomic_write(run_dir / "results.csv", table.to_csv(), what="results")
    atomic_write(run_dir / "results.json", strict_json(module.test_results, indent=1), what="results")
    atomic_write(run_dir / "samples.jsonl", "".join(strict_json(row) + "\n" for row in module.generations),
                 what="samples")
    return table


def fit_from_checkpoint(trainer: L.Trainer, module, data, ckpt_path: str | None) -> None:
    """trainer.fit, with a checkpoint that does not load, or a diverged run, reported in one line."""
    try:
        # weights_only: a checkpoint is data, never code (optimizer, loop and callback states all load so).
        trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    except TrainingDiverged as err:
        if getattr(err, "names_checkpoint", False):
            raise
        raise TrainingDiverged(f"{err}{kept_checkpoint_note(trainer)}") from err
    except (pickle.UnpicklingError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if ckpt_path is None or not lines:
            raise
        if isinstance(err, pickle.UnpicklingError):
            raise UserError(f"cannot load resume checkpoint {ckpt_path} with weights_only=True: {lines[0]}") from err
        if lines[0].startswith("Error(s) in loading state_dict"):
            detail = lines[1][:300] if len(lines) > 1 else lines[0]
            raise UserError(f"resume checkpoint {ckpt_path} does not fit this model (changed config?): "
                            f"{detail}") from err
        raise


def kept_checkpoint_note(trainer: L.Trainer) -> str:
    """Where the last checkpoint that trains is (its weights gave a finite loss at the next step),
    and its step; a later one whose weights gave the non-finite loss was discarded."""
    from lightning_modules.run.checkpointing import VerifiedCheckpoints

    verified = next((c for c in trainer.callbacks if isinstance(c, VerifiedCheckpoints)), None)
    discarded = sorted(set(verified.discarded)) if verified is not None else []
    dropped = (f"; the checkpoint of step {', '.join(map(str, discarded))} (finite weights that gave this loss) "
               "was discarded") if discarded else ""
    callback = trainer.checkpoint_callback
    last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
    if last is None or not last.is_file():
        return f"{dropped}; no checkpoint was written before it (lower optim.lr and start again)"
    step = saved_step(last)
    return (f"{dropped}; last good checkpoint kept: resume from {last} (step {step}, the last one whose next step "
            "had a finite loss) with resume=last and a smaller optim.lr")


def run(cfg) -> pd.DataFrame | None:
    """Fit, test and write the results of one run; returns the test table (rank 0)."""
    exported_here = not os.environ.get(RUN_DIR_ENV)  # DDP ranks inherit it from rank 0 instead
    try:
        return _run(cfg)
    except OSError as err:  # TensorBoard's event files and other writers we do not own, on a full disk
        fault = storage_fault(err, cfg.run_dir)
        if fault is None:
            raise
        raise UserError(f"{fault}; the last complete checkpoint is kept") from err
    finally:
        if exported_here:  # the next run in this process (compare, tests) picks its own directory
            release_run_dir(Path(os.environ.get(RUN_DIR_ENV, cfg.run_dir)))
            os.environ.pop(RUN_DIR_ENV, None)


def _run(cfg) -> pd.DataFrame | None:
    check_accelerator_exists(cfg.trainer.get("accelerator"))  # before a run dir is made for a run that cannot start
    check_strategy(cfg)
    print_plan(cfg, strict=False)  # the first lines of every fit: what it will train, on what, at what memory
    run_dir = prepare_run_dir(cfg)
    # The run dir travels in the config from here on: `${run_dir}` interpolations (the judge cache),
    # config.yaml and the checkpoint's hparams name the directory actually used (with its `_N`).
    cfg.run_dir = str(run_dir)
    ckpt_path = resolve_checkpoint(cfg, run_dir)  # before anything is written into a finished run's dir
    if cfg.threads:
        # Tiny models gain little from threads, and oversubscribed cores (DDP ranks, a busy
        # laptop) slow CPU generation by orders of magnitude.
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    module, data = build_run(cfg)
    remember_base(module)  # the frozen base's digest, once, before a strategy shards the model
    identity = check_checkpoint_fits(module, ckpt_path)
    finished_step = saved_step(Path(ckpt_path)) if ckpt_path and is_finished(run_dir) else None
    trainer = build_trainer(cfg, run_dir, module)
    check_layout(cfg, trainer, ckpt_path, identity)
    with rank_faults(trainer, heartbeat_grace(cfg.trainer.get("strategy"))):
        return _train_and_test(cfg, run_dir, module, data, trainer, ckpt_path, finished_step)


FIT_OOM_HINT = ("lower data.batch_size (trainer.accumulate_grad_batches keeps the effective batch) or set "
                "model.gradient_checkpointing=true; the checkpoints written are kept: resume=last resumes")


@contextlib.contextmanager
def rank_faults(trainer: L.Trainer, heartbeat_s: float):
    """Under several processes a fault on a rank ends the run in one line naming the rank: an error
    is the rank's own line (`RankFailed`); a rank killed by a signal is named by rank 0, which watches
    the ranks Lightning's launcher started (run/ranks.py, as generation does), or else by the
    heartbeat of every rank after `heartbeat_s` seconds (torchrun, srun; rank 0 itself killed). The
    other ranks stop at their next collective (trainer.strategy.timeout at worst), and a rank left
    hanging is killed."""
    if trainer.world_size == 1:
        yield
        return
    kept = "the checkpoints already written are kept: resume=last resumes"
    watcher = ChildWatcher([], kept=kept, heartbeat_s=heartbeat_s)
    adopt_at_launch(trainer.strategy.launcher, watcher)
    trainer.callbacks.append(WatchRanks(watcher))
    orphan_note(kept)  # what an orphaned rank says (rank 0 killed): core/parent_watch.py
    done = False
    try:
        # launching: the ranks that trainer.fit starts learn rank 0's pid
        with launching(), ranks_faults(trainer.global_rank, watcher, oom_hint=FIT_OOM_HINT):
            yield
        done = True
    finally:
        watcher.stop(kill=not done)


def _train_and_test(cfg, run_dir: Path, module, data, trainer: L.Trainer, ckpt_path, finished_step):
    """Rank 0 writes what the run leaves behind (config, archive, model, results, export)."""
    scale = _log_scale(cfg, trainer)
    _fit(cfg, run_dir, module, data, trainer, ckpt_path, finished_step)
    weights = gathered_model_weights(trainer, module)  # None unless FSDP / ZeRO-3 hold the weights in shards
    if trainer.global_rank == 0:  # saved before the test: a failed test never loses the weights
        save_model(module, cfg, run_dir, weights)
    if cfg.eval.test_at_end:
        trainer.test(module, data, verbose=False)
    log_hparams_summary(trainer, module, scale)
    if trainer.global_rank != 0:
        return None
    table = write_results(run_dir, module) if cfg.eval.test_at_end else None
    finish_export(module, cfg, run_dir, table, weights)
    if table is not None:
        print(f"\nresults on the test split ({run_dir}/results.csv):")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        if cfg.eval.probes:
            run_probes(cfg, module, data, run_dir)
    return table


def _log_scale(cfg, trainer: L.Trainer) -> dict:
    """What makes runs on different GPU counts comparable, to every logger and (rank 0) the terminal."""
    scale = scale_hparams(cfg, trainer)
    for logger in trainer.loggers:
        logger.log_hyperparams({"scale": scale})
    if trainer.global_rank == 0:
        print(f"effective batch size {scale['effective_batch_size']} = {scale['batch_size_per_device']} per device "
              f"x {scale['accumulate_grad_batches']} accumulated x {scale['world_size']} process(es)")
    return scale


def _fit(cfg, run_dir: Path, module, data, trainer: L.Trainer, ckpt_path, finished_step) -> None:
    """config.yaml, the step-0 validation, trainer.fit; a finished run trained further is archived first."""
    if ckpt_path is None and trainer.global_rank == 0:  # a resume rewrites it once the checkpoint has loaded
        atomic_write(run_dir / "config.yaml", to_yaml(cfg), what="config")
    if cfg.eval.val_at_start and ckpt_path is None:  # inside fit: the strategy is set up once
        trainer.callbacks.append(ValidateAtStart())
    fit_from_checkpoint(trainer, module, data, ckpt_path)
    if finished_step is not None and trainer.global_rank == 0:
        archive = archive_finished_run(run_dir, finished_step)
        print(f"the results of step {finished_step} moved to {archive}")
    if ckpt_path is not None and trainer.global_rank == 0:
        atomic_write(run_dir / "config.yaml", to_yaml(cfg), what="config")
