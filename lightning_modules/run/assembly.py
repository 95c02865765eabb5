"""Run assembly: the Trainer, and the (module, datamodule) pair of a validated config; also used
by `evaluate`, `compare` and `harvest`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from core.errors import UserError
from datamodules.safety import resolve_data_files
from lightning_modules.analysis.probes import parse_probe_settings
from lightning_modules.config.trainer import make_trainer, trainer_kwargs
from lightning_modules.methods import get_method
from lightning_modules.run.fault_injection import injected_faults
from lightning_modules.run.checkpointing import AtomicCheckpointIO, PerBatchSeed, VerifiedCheckpoints
from lightning_modules.run.harvest import harvest_forget_set
from lightning_modules.run.identity import RunIdentity
from lightning_modules.run.loggers import build_loggers
from lightning_modules.run.pretrain import corpus_texts, ensure_tiny_base
from lightning_modules.run.strategies import build_strategy
from models.backbone import build_backbone, is_built_from_config
from models.precision import apply_master_weights


def build_trainer(cfg, run_dir: Path, module=None) -> L.Trainer:
    """The Trainer for a run; `module` lets a strategy inspect the model (FSDP's wrap policy)."""
    logger = build_loggers(cfg, run_dir)  # configs/logger/*; False when trainer.logger=false
    checkpoint = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=cfg.checkpoint.save_last,
                                 save_top_k=cfg.checkpoint.save_top_k,
                                 every_n_train_steps=cfg.checkpoint.every_n_train_steps)
    kwargs = trainer_kwargs(cfg.trainer)
    kwargs.pop("logger", None)
    kwargs.setdefault("default_root_dir", str(run_dir))
    kwargs["strategy"] = build_strategy(kwargs.get("strategy"), getattr(module, "model", None),
                                        precision=kwargs.get("precision"), deterministic=kwargs.get("deterministic"))
    # Our samplers shard data themselves (eval without padding): Lightning must not replace them.
    kwargs["use_distributed_sampler"] = False
    # Resumable runs: checkpoint files written atomically, dropout streams a function of the step.
    # A checkpoint replaces last.ckpt only once the next step's loss is finite (the divergence guard).
    checkpoint_io = AtomicCheckpointIO()
    callbacks = [checkpoint, VerifiedCheckpoints(checkpoint_io), PerBatchSeed(cfg.seed), RunIdentity()] + \
        ([LearningRateMonitor("step")] if logger else []) + injected_faults()  # tests only: unset, none
    trainer = make_trainer(logger=logger, callbacks=callbacks, plugins=[checkpoint_io], **kwargs)
    effective = cfg.data.get("effective_batch_size")
    if effective is not None:  # chosen now that the device count is known
        if "accumulate_grad_batches" in cfg.trainer:
            raise UserError("set data.effective_batch_size or trainer.accumulate_grad_batches, not both")
        trainer.accumulate_grad_batches = accumulation_steps(int(effective), int(cfg.data.batch_size),
                                                             trainer.world_size)
    return trainer


def accumulation_steps(effective: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation that makes per_device x steps x world_size = effective (the official
    8-GPU batch on fewer GPUs); an effective batch it cannot reach exactly is an error."""
    per_step = per_device * world_size
    if effective % per_step:
        raise UserError(f"data.effective_batch_size={effective} is not a multiple of data.batch_size={per_device} "
                        f"x {world_size} process(es)")
    return effective // per_step


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


def build_run(cfg):
    """(module, datamodule) for a validated config; also used by `evaluate` and `compare`."""
    method = get_method(cfg.method.name)
    method.parse_params(cfg.method)  # an unknown method or method key fails before a model is loaded
    parse_probe_settings(cfg)  # likewise the probes' settings
    if cfg.eval.test_split == "val" and cfg.data.get("whole_train_file"):
        raise UserError("eval.test_split=val with data.whole_train_file=true: the validation rows are training rows, "
                        "so they cannot choose hyperparameters; set data.whole_train_file=false")
    files = resolve_data_files(cfg.data)
    if cfg.eval.test_split not in ("test", "val"):
        raise UserError(f"eval.test_split must be 'test' or 'val', got '{cfg.eval.test_split}'")
    if cfg.eval.test_split == "val":  # hyperparameters are chosen on validation data, never on test
        files = dataclasses.replace(files, test=files.val)
    if cfg.model.name_or_path == "tiny" and files.world_dir is not None:
        cfg.model.name_or_path = str(ensure_tiny_base(cfg, files))
    texts = None
    if is_built_from_config(cfg.model.name_or_path):
        texts = corpus_texts(files, [files.compliance_cue, files.refusal_cue])
    model, processor = build_backbone(cfg.model, texts)
    data = method.datamodule_class(cfg.data, files, processor, seed=cfg.seed)
    module = method(model, processor, cfg, eval_set_names=data.eval_set_names)  # one metric per eval set
    if hasattr(data, "build_forget_retain"):  # explicit steps of assembly, before any update
        data.build_forget_retain(harvest=lambda rows: harvest_forget_set(module, rows, data))
        module.forget_loader = data.forget_dataloader  # the reference-NLL pass reads the forget set from here
        module.retain_loader = data.retain_dataloader
    # Last, once the method has chosen its trainable tensors and the harvest has generated: fp32
    # masters for them (optim.master_weights=fp32), unless DeepSpeed / FSDP keep their own.
    apply_master_weights(module.model, cfg)
    return module, data
