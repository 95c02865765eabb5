"""What a checkpoint records about the run that wrote it (`checkpoint["run_identity"]`), and what a
resume checks against it before the Trainer writes anything.

- Trainable-only checkpoints: when a run's frozen parameters outnumber its trained ones (LoRA, RMU,
  projector-only), its checkpoints hold the trained tensors and the buffers only; the frozen base is
  named (model.name_or_path, model.revision) and hashed (`core.checkpoints.tensors_digest`, once per
  process, before a strategy shards the model). A 7B LoRA checkpoint is then megabytes, not 14 GB.
  Full fine-tuning keeps full checkpoints.
- A resume onto another base (other weights behind the checkpoint's left-out keys), another world
  size or another strategy is refused in one line naming both values. A single-file checkpoint holds
  the whole state, so with resume_allow_changes=true it loads onto another world size or strategy,
  and the run says so; a sharded checkpoint directory loads only onto the layout that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from core.checkpoints import check_base, tensors_digest
from core.errors import UserError

IDENTITY_FILE = "run_identity.json"  # inside a sharded checkpoint directory


def frozen_keys(model) -> list[str]:
    """state_dict keys of `model`'s frozen parameters (tied names included)."""
    return sorted(n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)


def remember_base(module) -> dict:
    """The module's base identity, computed once (call it before a strategy shards the model)."""
    identity = getattr(module, "base_identity", None)
    if identity is not None:
        return identity
    model = getattr(module, "model", None)
    hparams = dict(getattr(module, "hparams", {}) or {}).get("model") or {}
    identity = {"name_or_path": hparams.get("name_or_path"), "revision": hparams.get("revision"),
                "trainable_only": False}
    if model is not None:
        unique = {id(p): p for p in model.parameters()}.values()
        frozen = sum(p.numel() for p in unique if not p.requires_grad)
        if frozen > sum(p.numel() for p in unique if p.requires_grad):
            keys = frozen_keys(model)
            identity.update(trainable_only=True, frozen_keys=len(keys),
                            base_digest=tensors_digest(model.state_dict(), keys))
            module.left_out_keys = keys
    module.base_identity = identity
    return identity


def layout(trainer: L.Trainer) -> dict:
    return {"world_size": int(trainer.world_size), "strategy": type(trainer.strategy).__name__}


class RunIdentity(L.Callback):
    """Adds `run_identity` to every checkpoint and leaves the frozen base out of trainable-only ones."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        identity = remember_base(pl_module)
        # A sharded directory (DCP) keeps the whole state: torch's loader plans every key of the module,
        # and the frozen shards are only 1/world of the base on each rank anyway.
        writes_directory = getattr(trainer.strategy, "writes_directory", None)
        trimmed = identity["trainable_only"] and not (writes_directory is not None and writes_directory())
        checkpoint["run_identity"] = {**identity, "trainable_only": trimmed, **layout(trainer)}
        state = checkpoint.get("state_dict")
        if trimmed and isinstance(state, dict):
            for key in pl_module.left_out_keys:
                state.pop(f"model.{key}", None)


def check_left_out(module, saved_state: dict, identity: dict, path) -> None:
    """A trainable-only checkpoint's left-out tensors, rebuilt from this run's config, are the ones it
    was trained on (else one line naming both bases); Lightning then loads it non-strictly."""
    model_state = module.model.state_dict()
    left_out = sorted(k for k in model_state if f"model.{k}" not in saved_state)
    current = remember_base(module)
    digest = current.get("base_digest") if left_out == getattr(module, "left_out_keys", None) else \
        tensors_digest(model_state, left_out)
    check_base(identity, {**current, "base_digest": digest}, path)
    module.strict_loading = False  # the missing keys are this run's own frozen base, checked above


def read_identity(path: Path, header: dict | None = None) -> dict:
    """The run_identity of a checkpoint file (its loaded header) or directory ({} if none)."""
    if header is not None:
        return dict(header.get("run_identity") or {})
    try:
        return json.loads((Path(path) / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return {}


def check_layout(cfg, trainer: L.Trainer, path, identity: dict) -> None:
    """The world size and strategy of the resumed checkpoint against this run's."""
    if not identity or "world_size" not in identity:
        return
    saved, now = {k: identity.get(k) for k in ("world_size", "strategy")}, layout(trainer)
    if saved == now:
        return
    was = f"{saved['world_size']} process(es) under {saved['strategy']}"
    then = f"{now['world_size']} under {now['strategy']}"
    if Path(path).is_dir():
        raise UserError(f"resume checkpoint {path} is sharded for {was}; this run has {then}: set "
                        "trainer.devices / trainer.num_nodes / trainer.strategy back to the checkpoint's")
    if not cfg.resume_allow_changes:
        raise UserError(f"resume checkpoint {path} was written by {was}; this run has {then}: set "
                        "trainer.devices / trainer.num_nodes / trainer.strategy back, or pass "
                        "resume_allow_changes=true to load its whole state on the new layout")
    if trainer.global_rank == 0:
        print(f"resume: checkpoint {path} of {was} converted to {then} (its weights and optimizer state "
              "are whole in the file); the data order differs from an uninterrupted run")
