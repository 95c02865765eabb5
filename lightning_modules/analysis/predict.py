"""Generation for `evaluate`: every example not yet in `samples.jsonl` is answered (greedy, batched,
left-padded, through `core.generation.greedy_generate` under `Trainer.predict`) and appended batch by
batch, so an interrupted evaluation resumes where it stopped. A suite shares one model across its
tasks (`SharedGenerator`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from core.checkpoints import check_base, read_checkpoint, tensors_digest
from core.distributed import free_memory, shards_parameters
from core.errors import UserError
from lightning_modules.config.trainer import make_trainer, trainer_kwargs
from core.generation import greedy_generate
from datamodules.collate import VLMCollator
from datamodules.examples import Example
from metrics.classify import classify, sample_row
from metrics.samples import SAMPLES, append_samples, example_key, read_samples, record_key
from models.backbone import build_backbone, is_built_from_config


class GenerationModule(L.LightningModule):
    """Generation only, under `Trainer.predict`, through the same `greedy_generate` as validation."""

    def __init__(self, model, processor, max_new_tokens: int):
        super().__init__()
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        synced = shards_parameters(self.trainer.strategy)
        return greedy_generate(self.model, self.processor, batch, self.max_new_tokens, synced)


class SampleWriter(BasePredictionWriter):
    """Appends each batch's generations to samples.jsonl as soon as they exist."""

    def __init__(self, path: Path, refusal_preset: str):
        super().__init__(write_interval="batch")
        self.path = path
        self.refusal_preset = refusal_preset

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        append_samples(self.path, [sample_row(ex.extra["set"], ex, r, classify(r, ex, self.refusal_preset, None))
                                   for ex, r in zip(batch["examples"], prediction)])


def load_fit_checkpoint(model, path: str) -> None:
    """Weights of a Lightning checkpoint written by `fit` (keys `model.*`), loaded safely."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    ckpt = read_checkpoint(Path(path), label="checkpoint")
    weights = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    identity = ckpt.get("run_identity") or {}
    if identity.get("trainable_only") and weights and not unexpected:  # the base it left out: the one built here?
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or "the model built from config"
        check_base(identity, {"name_or_path": base, "base_digest": tensors_digest(model.state_dict(), missing)},
                   path, label="checkpoint")
        missing = []
    if missing or unexpected or not weights:
        detail = [f"{len(missing)} missing (e.g. '{missing[0]}')"] if missing else []
        detail += [f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')"] if unexpected else []
        raise UserError(f"{path}: weights do not fit model.name_or_path and model.finetune: "
                        f"{'; '.join(detail) or 'no model.* weights'}")


def build_generator(cfg, checkpoint: Optional[str], examples: list[Example]) -> GenerationModule:
    texts = None
    if is_built_from_config(cfg.model.name_or_path):  # a tokenizer trained on every evaluated text
        texts = [ex.instruction for ex in examples] + [ex.response or "" for ex in examples]
    model, processor = build_backbone(cfg.model, texts)
    if checkpoint:
        load_fit_checkpoint(model, checkpoint)
    return GenerationModule(model, processor, int(cfg.eval.max_new_tokens))


def build_predict_trainer(cfg, run_dir: Path, writer: SampleWriter) -> L.Trainer:
    kwargs = trainer_kwargs(cfg.trainer)
    kwargs.update(logger=False, enable_checkpointing=False, callbacks=[writer], use_distributed_sampler=False,
                  default_root_dir=str(run_dir))
    trainer = make_trainer(**kwargs)
    if trainer.world_size > 1:
        raise UserError("evaluate runs on one device: set trainer.devices=1 (split files across runs instead)")
    return trainer


class SharedGenerator:
    """One generation model for several `generate_missing` calls (a suite's tasks): built on first
    use -- never when every answer already exists -- and freed by `release()` before judging.
    `examples_of` gives the texts a model built from config trains its tokenizer on (called only then)."""

    def __init__(self, cfg, checkpoint: Optional[str], examples_of: Callable[[], list[Example]]):
        self.cfg, self.checkpoint, self.examples_of = cfg, checkpoint, examples_of
        self.module: Optional[GenerationModule] = None

    def __call__(self) -> GenerationModule:
        if self.module is None:
            tiny = is_built_from_config(self.cfg.model.name_or_path)
            if tiny:  # its random weights: the same model whichever tasks are left to generate
                L.seed_everything(self.cfg.seed, verbose=False)
            self.module = build_generator(self.cfg, self.checkpoint, self.examples_of() if tiny else [])
        return self.module

    def release(self) -> None:
        self.module = None
        free_memory()


def generate_missing(cfg, examples: list[Example], run_dir: Path, checkpoint: Optional[str] = None,
                     system_prompt: Optional[str] = None, generator: Optional[SharedGenerator] = None) -> int:
    """Generate every example not yet in samples.jsonl; returns how many were generated. The model
    is `generator`'s, else built here and freed at the end."""
    path = run_dir / SAMPLES
    done = {record_key(r) for r in read_samples(path)}
    pending = [ex for ex in examples if example_key(ex) not in done]
    if not pending:
        return 0
    print(f"generating {len(pending)} of {len(examples)} answers ({len(examples) - len(pending)} already in {path})")
    module = generator() if generator else build_generator(cfg, checkpoint, examples)
    collate = VLMCollator(module.processor, cfg.data.max_length, train=False, image_mode=cfg.data.image_mode,
                          system_prompt=system_prompt or cfg.data.get("system_prompt"),
                          image_aspect_ratio=cfg.data.get("image_aspect_ratio", "original"))
    loader = DataLoader(pending, batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=collate,
                        num_workers=cfg.data.num_workers)
    trainer = build_predict_trainer(cfg, run_dir, SampleWriter(path, cfg.eval.refusal_preset))
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    del module, trainer
    if generator is None:
        free_memory()
    return len(pending)
