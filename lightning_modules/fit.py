"""Entry point: `python -m lightning_modules.fit --config configs/demo.yaml [key=value ...]`.

Builds the data (the Mirage World or VLGuard-format files), the model (a Hugging Face id, or the
tiny base pre-trained and cached for the world), the method's LightningModule, and a Lightning
Trainer; validates at step 0, fits, tests, and writes `results.csv` / `results.json` /
`samples.jsonl` in the run directory. Options: `--print-config`, `--debug` (full tracebacks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import zipfile
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from datamodules.safety import resolve_data_files
from models.backbone import build_backbone
from lightning_modules.base import get_method
from lightning_modules.checkpointing import AtomicCheckpointIO, PerBatchSeed
from lightning_modules.config import config_cli, to_yaml
from core.errors import UserError, cli_main
from lightning_modules.strategies import build_strategy, gathered_model_weights

RUN_DIR_ENV = "SAFETY_MIRAGE_RUN_DIR"  # DDP re-runs this script per rank: all ranks share rank 0's dir
RESULT_COLUMNS = ["asr", "refusal_rate", "ir", "accuracy", "n"]


def prepare_run_dir(cfg) -> Path:
    """The run directory, writable; a finished run's results are never overwritten (a new
    `_N` suffix is taken unless resuming; `resume=auto` never resumes a finished run)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    run_dir = Path(cfg.run_dir)
    if not cfg.resume or cfg.resume == "auto":
        n, base = 1, run_dir
        while (run_dir / "results.csv").exists():
            run_dir, n = base.with_name(f"{base.name}_{n}"), n + 1
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # One probe per process: under torchrun / SLURM every rank runs this at the same time.
        probe = run_dir / f".write_test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run_dir '{run_dir}' is not writable: {err.strerror}") from err
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def build_trainer(cfg, run_dir: Path, module=None) -> L.Trainer:
    """The Trainer for a run; `module` lets a strategy inspect the model (FSDP's wrap policy)."""
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    checkpoint = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=cfg.checkpoint.save_last,
                                 save_top_k=cfg.checkpoint.save_top_k,
                                 every_n_train_steps=cfg.checkpoint.every_n_train_steps)
    kwargs = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    kwargs.setdefault("default_root_dir", str(run_dir))
    kwargs["strategy"] = build_strategy(kwargs.get("strategy"), getattr(module, "model", None))
    # Our samplers shard data themselves (eval without padding): Lightning must not replace them.
    kwargs["use_distributed_sampler"] = False
    # Resumable runs: checkpoint files written atomically, dropout streams a function of the step.
    callbacks = [checkpoint, LearningRateMonitor("step"), PerBatchSeed(cfg.seed)]
    try:
        return L.Trainer(logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()], **kwargs)
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise UserError(f"invalid trainer config: {str(err).splitlines()[0]}") from err


def scale_hparams(cfg, trainer: L.Trainer) -> dict:
    """What makes runs on different GPU counts comparable, logged as hyperparameters."""
    accumulate = int(trainer.accumulate_grad_batches)
    scale = {"world_size": trainer.world_size, "num_nodes": trainer.num_nodes, "devices_per_node": trainer.num_devices,
             "batch_size_per_device": int(cfg.data.batch_size), "accumulate_grad_batches": accumulate,
             "effective_batch_size": int(cfg.data.batch_size) * accumulate * trainer.world_size,
             "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__, "seed": int(cfg.seed)}
    if cfg.data.kind == "mirage_world":
        scale["world_seed"] = int(cfg.data.world.get("seed", 0))
    return scale


def log_hparams_summary(trainer: L.Trainer, module, scale: dict) -> None:
    """TensorBoard's HParams view: the config + scale against the final val/test metrics."""
    metrics = {f"hp/{k}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
    if trainer.logger is not None and metrics:
        trainer.logger.log_hyperparams({**module.hparams, "scale": scale}, metrics=metrics)


def results_table(results: dict[str, dict[str, float]]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(results, orient="index").reindex(columns=RESULT_COLUMNS)
    table.index.name = "eval_set"
    return table


def write_results(run_dir: Path, module) -> pd.DataFrame:
    table = results_table(module.test_results)
    table.to_csv(run_dir / "results.csv")
    (run_dir / "results.json").write_text(json.dumps(module.test_results, indent=1))
    with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as fh:
        for row in module.generations:
            fh.write(json.dumps(row) + "\n")
    return table


def resolve_checkpoint(cfg, run_dir: Path):
    """`resume`: "last" (this run dir's last.ckpt), a checkpoint path, or "auto": the newest of
    last.ckpt and the checkpoints Lightning saves when SLURM pre-empts a job (hpc_ckpt_N.ckpt),
    else a fresh start -- one command for a job that a cluster may requeue."""
    if not cfg.resume:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto":
        found = [p for p in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.exists()]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    path = last if str(cfg.resume) in ("last", "true", "True") else Path(cfg.resume)
    if not path.exists():  # a file, or a directory for sharded (DeepSpeed / FSDP) checkpoints
        raise UserError(f"resume checkpoint not found: {path}")
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(f"resume checkpoint {path} is not a PyTorch checkpoint (truncated or another file)")
    return str(path)


def fit_from_checkpoint(trainer: L.Trainer, module, data, ckpt_path: str | None) -> None:
    """trainer.fit, with a checkpoint that does not load reported in one line."""
    try:
        # weights_only: a checkpoint is data, never code (optimizer, loop and callback states all load so).
        trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
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


def build_run(cfg):
    """(module, datamodule) for a validated config; also used by `evaluate` and `compare`."""
    method = get_method(cfg.method.name)
    method.parse_params(cfg.method)  # an unknown method or method key fails before a model is loaded
    from lightning_modules.probes import parse_probe_settings

    parse_probe_settings(cfg)  # likewise the probes' settings
    files = resolve_data_files(cfg.data)
    if cfg.eval.test_split not in ("test", "val"):
        raise UserError(f"eval.test_split must be 'test' or 'val', got '{cfg.eval.test_split}'")
    if cfg.eval.test_split == "val":  # hyperparameters are chosen on validation data, never on test
        files = dataclasses.replace(files, test=files.val)
    if cfg.model.name_or_path == "tiny" and files.world_dir is not None:
        from lightning_modules.pretrain import ensure_tiny_base

        cfg.model.name_or_path = str(ensure_tiny_base(cfg, files))
    texts = None
    if cfg.model.name_or_path == "tiny":
        from lightning_modules.pretrain import corpus_texts

        texts = corpus_texts(files, [files.compliance_cue, files.refusal_cue])
    model, processor = build_backbone(cfg.model, texts)
    module = method(model, processor, cfg)
    data = method.datamodule_class(cfg.data, files, processor, seed=cfg.seed)
    if hasattr(data, "build_forget_retain"):  # explicit steps of assembly, before any update
        from lightning_modules.harvest import harvest_forget_set

        data.build_forget_retain(harvest=lambda rows: harvest_forget_set(module, rows, data))
        module.forget_loader = data.forget_dataloader  # the reference-NLL pass reads the forget set from here
    return module, data


def run(cfg) -> pd.DataFrame | None:
    """Fit, test and write the results of one run; returns the test table (rank 0)."""
    exported_here = not os.environ.get(RUN_DIR_ENV)  # DDP ranks inherit it from rank 0 instead
    try:
        return _run(cfg)
    finally:
        if exported_here:  # the next run in this process (compare, tests) picks its own directory
            os.environ.pop(RUN_DIR_ENV, None)


def _run(cfg) -> pd.DataFrame | None:
    run_dir = prepare_run_dir(cfg)
    ckpt_path = resolve_checkpoint(cfg, run_dir)  # before anything is written into a finished run's dir
    if cfg.threads:
        # Tiny models gain little from threads, and oversubscribed cores (DDP ranks, a busy
        # laptop) slow CPU generation by orders of magnitude.
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    module, data = build_run(cfg)
    trainer = build_trainer(cfg, run_dir, module)
    if ckpt_path is None:  # a resume rewrites it once the checkpoint has loaded (a wrong one changes nothing)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    scale = scale_hparams(cfg, trainer)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams({"scale": scale})
    if trainer.global_rank == 0:
        print(f"effective batch size {scale['effective_batch_size']} = {scale['batch_size_per_device']} per device "
              f"x {scale['accumulate_grad_batches']} accumulated x {scale['world_size']} process(es)")
    if cfg.eval.val_at_start and ckpt_path is None:
        trainer.validate(module, data, verbose=False)
    fit_from_checkpoint(trainer, module, data, ckpt_path)
    if ckpt_path is not None and trainer.global_rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    weights = gathered_model_weights(trainer, module)  # None unless FSDP / ZeRO-3 hold the weights in shards
    if trainer.global_rank == 0:
        target = run_dir / "model"
        module.model.save_pretrained(target, state_dict=weights)
        module.processor.save_pretrained(target)
    if not cfg.eval.test_at_end:
        log_hparams_summary(trainer, module, scale)
        return None
    trainer.test(module, data, verbose=False)
    log_hparams_summary(trainer, module, scale)
    if trainer.global_rank != 0:
        return None
    table = write_results(run_dir, module)
    print(f"\nresults on the test split ({run_dir}/results.csv):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    if cfg.eval.probes:
        from lightning_modules.probes import run_probes

        run_probes(cfg, module, data, run_dir)
    return table


@cli_main
def main(argv: list[str]) -> None:
    config_cli(argv, "python -m lightning_modules.fit", __doc__.splitlines()[0], "configs/demo.yaml", run)


if __name__ == "__main__":
    main()
