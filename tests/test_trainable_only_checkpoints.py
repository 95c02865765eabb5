"""Trainable-only checkpoints (the frozen base named and hashed, not stored) and the run identity a
resume is checked against: base, world size, strategy."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
from torch import nn

from core.errors import UserError
from lightning_modules.run.checkpointing import AtomicCheckpointIO
from lightning_modules.run.identity import RunIdentity, check_layout, remember_base
from lightning_modules.run.resume import check_checkpoint_fits


class Tiny(L.LightningModule):
    """A frozen 'base' layer and a trained head; `frozen` picks whether the base trains too."""

    def __init__(self, base_seed: int = 0, freeze: bool = True):
        super().__init__()
        self.save_hyperparameters({"model": {"name_or_path": f"base-{base_seed}", "revision": None}})
        torch.manual_seed(base_seed)
        base = nn.Linear(32, 32)
        torch.manual_seed(100)
        self.model = nn.Sequential(base, nn.ReLU(), nn.Linear(32, 2))
        base.requires_grad_(not freeze)
        self.register_buffer("control_vector", torch.ones(2))

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.1)


def fit(module, root: Path, ckpt_path=None, max_steps=2):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 32)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), plugins=[AtomicCheckpointIO()],
                        callbacks=[RunIdentity(), ModelCheckpoint(dirpath=str(root), save_last=True)])
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    return trainer, root / "last.ckpt"


def test_a_run_whose_frozen_part_dominates_checkpoints_only_what_trains(tmp_path):
    module = Tiny()
    _, path = fit(module, tmp_path)
    ckpt = torch.load(path, weights_only=True)
    assert sorted(ckpt["state_dict"]) == ["control_vector", "model.2.bias", "model.2.weight"]
    identity = ckpt["run_identity"]
    assert identity["trainable_only"] and identity["name_or_path"] == "base-0" and len(identity["base_digest"]) == 64
    assert identity["world_size"] == 1 and identity["strategy"] == "SingleDeviceStrategy"
    # Resumed on the same base: the base comes from the rebuilt module, the head from the checkpoint.
    again = Tiny()
    check_checkpoint_fits(again, str(path))
    fit(again, tmp_path / "resumed", ckpt_path=str(path), max_steps=3)
    assert torch.equal(again.model[0].weight, Tiny().model[0].weight)  # the frozen base, untouched
    # Another base behind the same names and shapes: refused in one line naming both.
    with pytest.raises(UserError, match=r"holds only the trained tensors of base base-0 \(weights [0-9a-f]{12}\), "
                                        r"but this run's base is base-1 \(weights [0-9a-f]{12}\)"):
        check_checkpoint_fits(Tiny(base_seed=1), str(path))


def test_full_fine_tuning_keeps_full_checkpoints(tmp_path):
    _, path = fit(Tiny(freeze=False), tmp_path)
    ckpt = torch.load(path, weights_only=True)
    assert "model.0.weight" in ckpt["state_dict"] and not ckpt["run_identity"]["trainable_only"]
    assert "base_digest" not in ckpt["run_identity"]


def test_a_trainable_only_checkpoint_of_another_model_is_still_refused(tmp_path):
    _, path = fit(Tiny(), tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["model.9.weight"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="does not fit this model .*Unexpected key"):
        check_checkpoint_fits(Tiny(), str(tmp_path / "other.ckpt"))


def test_the_digest_is_computed_once(tmp_path):
    module = Tiny()
    first = remember_base(module)
    module.model[0].weight.data.add_(1)  # a later change is not re-hashed: the digest is of the base as built
    assert remember_base(module) is first


@pytest.mark.parametrize("saved, allow, expected", [
    ({"world_size": 2, "strategy": "DDPStrategy"}, False,
     "was written by 2 process(es) under DDPStrategy; this run has 1 under SingleDeviceStrategy"),
    ({"world_size": 1, "strategy": "DeepSpeedStrategy"}, False,
     "was written by 1 process(es) under DeepSpeedStrategy; this run has 1 under SingleDeviceStrategy"),
    ({"world_size": 2, "strategy": "DDPStrategy"}, True, None),
])
def test_a_resume_on_another_layout_is_refused_or_converted_and_said_so(saved, allow, expected, tmp_path, capsys):
    from omegaconf import OmegaConf

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    cfg = OmegaConf.create({"resume_allow_changes": allow})
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"")
    if expected:
        with pytest.raises(UserError, match=re.escape(f"resume checkpoint {path} {expected}")):
            check_layout(cfg, trainer, path, saved)
    else:
        check_layout(cfg, trainer, path, saved)
        assert "of 2 process(es) under DDPStrategy converted to 1 under SingleDeviceStrategy" in capsys.readouterr().out
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    with pytest.raises(UserError, match="is sharded for 2 process"):
        check_layout(OmegaConf.create({"resume_allow_changes": True}), trainer, sharded,
                     {"world_size": 2, "strategy": "DDPStrategy"})


def test_evaluate_loads_a_trainable_only_checkpoint_onto_its_base_only(tmp_path):
    """`evaluate.checkpoint` / a suite's .ckpt entry: the base built from config, then the trained
    tensors; another base is refused in one line."""
    from lightning_modules.analysis.predict import load_fit_checkpoint

    trained = Tiny()
    _, path = fit(trained, tmp_path)
    model = Tiny().model
    load_fit_checkpoint(model, str(path))
    assert torch.equal(model[2].weight, trained.model[2].weight)
    assert torch.equal(model[0].weight, Tiny().model[0].weight)
    with pytest.raises(UserError, match=rf"checkpoint {path} holds only the trained tensors of base base-0 .* but this "
                                        r"run's base is"):
        load_fit_checkpoint(Tiny(base_seed=1).model, str(path))
