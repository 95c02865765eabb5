"""Entry point: `python -m lightning_modules.fit --config configs/demo.yaml [key=value ...]`.

Builds the data (the Mirage World or VLGuard-format files), the model (a Hugging Face id, or the
tiny base pre-trained and cached for the world), the method's LightningModule, and a Lightning
Trainer; validates at step 0, fits, tests, and writes `results.csv` / `results.json` /
`samples.jsonl` in the run directory. Options: `--print-config`, `--debug` (full tracebacks).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import zipfile
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from datamodules.safety import resolve_data_files
from models.backbone import build_backbone, is_built_from_config
from lightning_modules.base import TrainingDiverged, get_method
from lightning_modules.checkpointing import AtomicCheckpointIO, PerBatchSeed, saved_step
from lightning_modules.export import finish_export, save_model
from lightning_modules.config import config_cli, to_yaml
from lightning_modules.loggers import build_loggers, log_hparams_summary as log_to_loggers
from core.distributed import is_launch_rank_zero
from core.errors import UserError, cli_main
from core.files import DirectoryLock, atomic_write, in_use_error
from core.records import strict_json
from lightning_modules.strategies import build_strategy, gathered_model_weights

RUN_DIR_ENV = "SAFETY_MIRAGE_RUN_DIR"  # DDP re-runs this script per rank: all ranks share rank 0's dir
RESULT_COLUMNS = ["asr", "refusal_rate", "ir", "accuracy", "relevant", "n"]


_RUN_LOCKS: dict[str, DirectoryLock] = {}  # run dirs this process owns


def is_finished(run_dir: Path) -> bool:
    """A run that wrote its results (or, with eval.test_at_end=false, its model)."""
    return (run_dir / "results.csv").exists() or (run_dir / "model").exists()


def prepare_run_dir(cfg) -> Path:
    """The run directory, writable and locked by this process; a finished run's results are never
    overwritten (a new `_N` suffix is taken unless resuming; `resume=auto` never resumes a
    finished run). A second run on a locked directory fails at once."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])  # a DDP rank Lightning started: rank 0 holds the lock
    run_dir = Path(cfg.run_dir)
    if not cfg.resume or cfg.resume == "auto":
        n, base = 1, run_dir
        while is_finished(run_dir):
            run_dir, n = base.with_name(f"{base.name}_{n}"), n + 1
    if not is_launch_rank_zero():
        # torchrun / SLURM start every rank themselves: the directory is rank 0's to create and lock.
        os.environ[RUN_DIR_ENV] = str(run_dir)
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # One probe per process: under torchrun / SLURM every rank runs this at the same time.
        probe = run_dir / f".write_test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        lock = DirectoryLock(run_dir)
        locked = lock.acquire()
    except OSError as err:
        raise UserError(f"run_dir '{run_dir}' is not writable: {err.strerror}") from err
    if not locked:
        raise in_use_error(run_dir, lock)
    _RUN_LOCKS[str(run_dir)] = lock
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def release_run_dir(run_dir: Path | None = None) -> None:
    """Unlock `run_dir` (every run dir this process holds when None)."""
    for key in [str(run_dir)] if run_dir is not None else list(_RUN_LOCKS):
        lock = _RUN_LOCKS.pop(key, None)
        if lock is not None:
            lock.release()


def build_trainer(cfg, run_dir: Path, module=None) -> L.Trainer:
    """The Trainer for a run; `module` lets a strategy inspect the model (FSDP's wrap policy)."""
    logger = build_loggers(cfg, run_dir)  # configs/logger/*; False when trainer.logger=false
    checkpoint = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=cfg.checkpoint.save_last,
                                 save_top_k=cfg.checkpoint.save_top_k,
                                 every_n_train_steps=cfg.checkpoint.every_n_train_steps)
    kwargs = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    kwargs.pop("logger", None)
    kwargs.setdefault("default_root_dir", str(run_dir))
    kwargs["strategy"] = build_strategy(kwargs.get("strategy"), getattr(module, "model", None))
    # Our samplers shard data themselves (eval without padding): Lightning must not replace them.
    kwargs["use_distributed_sampler"] = False
    # Resumable runs: checkpoint files written atomically, dropout streams a function of the step.
    callbacks = [checkpoint, PerBatchSeed(cfg.seed)] + ([LearningRateMonitor("step")] if logger else [])
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


# Settings that may differ on a resume without changing what is trained: cache locations, loader
# workers, the encoding cache and the generation batch size.
RESUME_EXEMPT = {"data.num_workers", "data.cache_encodings", "data.eval_batch_size", "data.world_root",
                 "data.forget_retain.harvest_dir", "base.cache_dir"}
RESUME_COMPARED = ("model", "base", "data", "method")


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _run_config(run_dir: Path) -> dict:
    """The compared sections of the run's config.yaml (empty when there is none, or not a config)."""
    try:
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except Exception:  # noqa: BLE001 -- missing or unreadable: nothing to compare against
        return {}
    return {k: v for k, v in saved.items() if k in RESUME_COMPARED} if isinstance(saved, dict) else {}


def changed_settings(old: dict, cfg) -> list[str]:
    """Keys of the model, base, data and method sections that differ between `old` (the
    checkpoint's run config) and `cfg`."""
    new = OmegaConf.to_container(cfg, resolve=True)
    sections = [s for s in RESUME_COMPARED if isinstance(old.get(s), dict)]  # what the checkpoint recorded
    a = {k: v for s in sections for k, v in _flatten(old[s], s).items()}
    b = {k: v for s in sections for k, v in _flatten(new.get(s, {}), s).items()}
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUME_EXEMPT)
    # `tiny` is replaced by the cached base's path once built; that path follows from model.tiny,
    # base and data, which are compared themselves.
    if b.get("model.name_or_path") == "tiny" and str(a.get("model.name_or_path", "")).startswith(
            str(b.get("base.cache_dir"))):
        changed = [k for k in changed if k != "model.name_or_path"]
    return changed


def _sharded(path: Path) -> bool:
    """A DeepSpeed (`latest`, `checkpoint/`) or FSDP (`meta.pt`, `*.distcp`) checkpoint directory."""
    return any((path / name).exists() for name in ("latest", "checkpoint", "meta.pt")) or any(path.glob("*.distcp"))


def read_checkpoint(path: Path) -> dict:
    """Every member of a checkpoint file checked (zip CRCs) and its header loaded (weights_only,
    memory-mapped): a corrupt checkpoint is refused before anything is written."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(f"resume checkpoint {path} is not a PyTorch checkpoint (truncated or another file)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"resume checkpoint {path} is corrupt: {err}") from err
    if bad is not None:
        raise UserError(f"resume checkpoint {path} is corrupt: member '{bad}' fails its CRC check")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"cannot load resume checkpoint {path} with weights_only=True: "
                        f"{str(err).strip().splitlines()[0]}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"resume checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def resolve_checkpoint(cfg, run_dir: Path):
    """`resume`: "last" (this run dir's last.ckpt), a checkpoint path, or "auto": the newest of
    last.ckpt and the checkpoints Lightning saves when SLURM pre-empts a job (hpc_ckpt_N.ckpt),
    else a fresh start -- one command for a job that a cluster may requeue.

    Before anything is written: the checkpoint is checked whole; a finished run is resumed only to
    train further (trainer.max_steps above its step; `archive_finished_run` keeps its results); a
    change of model, base, data or method settings is refused unless resume_allow_changes=true."""
    if not cfg.resume:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto":
        found = [p for p in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.exists()]
        if not found:
            return None
        path = max(found, key=lambda p: p.stat().st_mtime)
    else:
        path = last if str(cfg.resume) in ("last", "true", "True") else Path(cfg.resume)
    if not path.exists():  # a file, or a directory for sharded (DeepSpeed / FSDP) checkpoints
        raise UserError(f"resume checkpoint not found: {path}")
    old_cfg, step = {}, None
    if path.is_dir():
        if not _sharded(path):
            raise UserError(f"resume checkpoint {path} is a directory but not a sharded (DeepSpeed / FSDP) checkpoint")
    else:
        ckpt = read_checkpoint(path)
        old_cfg, step = dict(ckpt.get("hyper_parameters") or {}), ckpt.get("global_step")
        del ckpt
    # The module's hyperparameters leave `model` out (a name it ignores): the run's config.yaml has it.
    for section, value in _run_config(run_dir).items():
        old_cfg.setdefault(section, value)
    if old_cfg:
        changed = changed_settings(old_cfg, cfg)
        if changed and not cfg.resume_allow_changes:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise UserError(f"resume checkpoint {path} was trained with other settings: {shown} changed "
                            "(set them back, or pass resume_allow_changes=true)")
    if is_finished(run_dir):
        max_steps = cfg.trainer.get("max_steps", -1)
        if step is None or max_steps is None or max_steps < 0 or max_steps <= step:
            raise UserError(f"run {run_dir} is finished (checkpoint at step {step}, results written); nothing "
                            f"to resume. To train further pass trainer.max_steps > {step}; to start over, "
                            "choose another run_dir")
    return str(path)


def check_checkpoint_fits(module, ckpt_path: str | None) -> None:
    """The checkpoint's weights have this model's names and shapes (else one line, before the
    Trainer writes its first log file)."""
    if ckpt_path is None or Path(ckpt_path).is_dir():
        return
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    expected = module.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    resized = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    for label, keys in (("Missing key(s)", missing), ("Unexpected key(s)", unexpected), ("Resized tensor(s)", resized)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise UserError(f"resume checkpoint {ckpt_path} does not fit this model (changed config?): "
                            f"{label} {shown}")


def archive_finished_run(run_dir: Path, step) -> Path:
    """A finished run trained further: its results, model and config move to
    `finished-step<N>/` before the new ones are written (nothing of it is overwritten)."""
    archive = run_dir / f"finished-step{step}"
    archive.mkdir(exist_ok=True)
    for name in ("results.csv", "results.json", "samples.jsonl", "model", "config.yaml"):
        if (run_dir / name).exists():
            os.replace(run_dir / name, archive / name)
    return archive


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
    """Where the last checkpoint with finite weights is, and its step (checkpoints with
    non-finite weights are never written)."""
    callback = trainer.checkpoint_callback
    last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
    if last is None or not last.is_file():
        return "; no checkpoint was written before it"
    step = saved_step(last)
    return f"; resume from {last} (step {step}, finite weights) with resume=last"


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
    if is_built_from_config(cfg.model.name_or_path):
        from lightning_modules.pretrain import corpus_texts

        texts = corpus_texts(files, [files.compliance_cue, files.refusal_cue])
    model, processor = build_backbone(cfg.model, texts)
    data = method.datamodule_class(cfg.data, files, processor, seed=cfg.seed)
    module = method(model, processor, cfg, eval_set_names=data.eval_set_names)  # one metric per eval set
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
            release_run_dir(Path(os.environ.get(RUN_DIR_ENV, cfg.run_dir)))
            os.environ.pop(RUN_DIR_ENV, None)


def _run(cfg) -> pd.DataFrame | None:
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
    check_checkpoint_fits(module, ckpt_path)
    finished_step = saved_step(Path(ckpt_path)) if ckpt_path and is_finished(run_dir) else None
    trainer = build_trainer(cfg, run_dir, module)
    if ckpt_path is None:  # a resume rewrites it once the checkpoint has loaded (a wrong one changes nothing)
        atomic_write(run_dir / "config.yaml", to_yaml(cfg), what="config")
    scale = scale_hparams(cfg, trainer)
    for logger in trainer.loggers:
        logger.log_hyperparams({"scale": scale})
    if trainer.global_rank == 0:
        print(f"effective batch size {scale['effective_batch_size']} = {scale['batch_size_per_device']} per device "
              f"x {scale['accumulate_grad_batches']} accumulated x {scale['world_size']} process(es)")
    if cfg.eval.val_at_start and ckpt_path is None:
        trainer.validate(module, data, verbose=False)
    fit_from_checkpoint(trainer, module, data, ckpt_path)
    if finished_step is not None and trainer.global_rank == 0:
        archive = archive_finished_run(run_dir, finished_step)
        print(f"the results of step {finished_step} moved to {archive}")
    if ckpt_path is not None and trainer.global_rank == 0:
        atomic_write(run_dir / "config.yaml", to_yaml(cfg), what="config")
    weights = gathered_model_weights(trainer, module)  # None unless FSDP / ZeRO-3 hold the weights in shards
    if trainer.global_rank == 0:  # saved before the test: a failed test never loses the weights
        save_model(module, cfg, run_dir, weights)
    if not cfg.eval.test_at_end:
        log_hparams_summary(trainer, module, scale)
        if trainer.global_rank == 0:
            finish_export(module, cfg, run_dir, None, sharded=weights is not None)
        return None
    trainer.test(module, data, verbose=False)
    log_hparams_summary(trainer, module, scale)
    if trainer.global_rank != 0:
        return None
    table = write_results(run_dir, module)
    finish_export(module, cfg, run_dir, table, sharded=weights is not None)
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
