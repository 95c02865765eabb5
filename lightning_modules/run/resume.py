"""Resuming a run: which checkpoint (`resume=last|auto|PATH`), checked whole and against the
run's settings before anything is written."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from core.checkpoints import check_sharded_checkpoint, load_deepspeed_file, read_checkpoint
from core.errors import UserError
from lightning_modules.config.diff import changed_keys, flatten
from lightning_modules.run.checkpointing import recover_checkpoint_dir
from lightning_modules.run.identity import check_left_out, read_identity
from lightning_modules.run.run_dir import is_finished


RESUME_COMPARED = ("model", "base", "data", "method")  # the sections that decide what is trained


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
    a = {k: v for s in sections for k, v in flatten(old[s], s).items()}
    b = {k: v for s in sections for k, v in flatten(new.get(s, {}), s).items()}
    changed = changed_keys(a, b)
    # `tiny` is replaced by the cached base's path once built; that path follows from model.tiny,
    # base and data, which are compared themselves.
    if b.get("model.name_or_path") == "tiny" and str(a.get("model.name_or_path", "")).startswith(
            str(cfg.base.cache_dir)):
        changed = [k for k in changed if k != "model.name_or_path"]
    return changed


def _sharded(path: Path) -> bool:
    """A DeepSpeed (`latest`, `checkpoint/`) or FSDP (`meta.pt`, `*.distcp`) checkpoint directory."""
    return any((path / name).exists() for name in ("latest", "checkpoint", "meta.pt")) or any(path.glob("*.distcp"))


def _sharded_header(path: Path) -> dict:
    """Lightning's own entries of a sharded checkpoint (hyper_parameters, global_step): FSDP's meta.pt;
    DeepSpeed keeps them as the client state of its model-states file (memory-mapped: its tensors
    are not read)."""
    if (path / "meta.pt").is_file():
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    states = sorted(path.rglob("*model_states.pt"))
    return load_deepspeed_file(states[0], "cpu", path, mmap=True) if states else {}


def checkpoint_to_resume(cfg, run_dir: Path) -> Path | None:
    """The path `resume` names: "last" (this run dir's last.ckpt), a checkpoint path, or "auto": the
    newest of last.ckpt and the checkpoints Lightning saves when SLURM pre-empts a job
    (hpc_ckpt_N.ckpt), else None -- one command for a job that a cluster may requeue."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto":
        found = [p for p in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.exists()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    path = last if str(cfg.resume) in ("last", "true", "True") else Path(cfg.resume)
    recover_checkpoint_dir(path)  # a sharded one left aside by a kill between the two renames of its swap
    if not path.exists():  # a file, or a directory for sharded (DeepSpeed / FSDP) checkpoints
        raise UserError(f"resume checkpoint not found: {path}")
    return path


def saved_settings(path: Path, run_dir: Path) -> tuple[dict, int | None]:
    """The settings a checkpoint was trained with (its hyperparameters, completed by the run's
    config.yaml) and its step; the file is checked whole first."""
    old_cfg, step = {}, None
    if path.is_dir():
        if not _sharded(path):
            raise UserError(f"resume checkpoint {path} is a directory but not a sharded (DeepSpeed / FSDP) checkpoint")
        check_sharded_checkpoint(path)  # DeepSpeed's and DCP's loaders unpickle: each pickle checked as data first
        header = _sharded_header(path)
        old_cfg, step = dict(header.get("hyper_parameters") or {}), header.get("global_step")
    else:
        ckpt = read_checkpoint(path)
        old_cfg, step = dict(ckpt.get("hyper_parameters") or {}), ckpt.get("global_step")
        del ckpt
    # The module's hyperparameters leave `model` out (a name it ignores): the run's config.yaml has it.
    for section, value in _run_config(run_dir).items():
        old_cfg.setdefault(section, value)
    return old_cfg, step


def resolve_checkpoint(cfg, run_dir: Path):
    """The checkpoint to resume from (`checkpoint_to_resume`), or None for a fresh start.

    Before anything is written: the checkpoint is checked whole; a change of model, base, data or
    method settings is refused unless resume_allow_changes=true; a finished run is resumed only to
    train further (trainer.max_steps above its step; `archive_finished_run` keeps its results)."""
    path = checkpoint_to_resume(cfg, run_dir) if cfg.resume else None
    if path is None:
        return None
    old_cfg, step = saved_settings(path, run_dir)
    changed = changed_settings(old_cfg, cfg) if old_cfg else []
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


def check_checkpoint_fits(module, ckpt_path: str | None) -> dict:
    """The checkpoint's weights have this model's names and shapes, and a trainable-only one was
    trained on this base (else one line, before the Trainer writes its first log file). Its
    `run_identity` ({} if none), for `check_layout` once the Trainer exists."""
    if ckpt_path is None:
        return {}
    if Path(ckpt_path).is_dir():
        return read_identity(Path(ckpt_path))
    header = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    saved, identity = header["state_dict"], read_identity(Path(ckpt_path), header)
    expected = module.state_dict()
    if identity.get("trainable_only"):  # the frozen base is left out: its keys are checked by digest
        expected = {k: v for k, v in expected.items() if k in saved or not k.startswith("model.")}
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    resized = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    for label, keys in (("Missing key(s)", missing), ("Unexpected key(s)", unexpected), ("Resized tensor(s)", resized)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise UserError(f"resume checkpoint {ckpt_path} does not fit this model (changed config?): "
                            f"{label} {shown}")
    if identity.get("trainable_only"):
        check_left_out(module, saved, identity, ckpt_path)
    return identity
