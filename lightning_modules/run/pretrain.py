"""The tiny unaligned base model for the Mirage World, built once and cached by its config.

Two stages, as LLaVA is built (a vision tower trained jointly from scratch recognised
shapes 34% of the time; pre-trained and frozen, 96-100%):
1. the CLIP tower learns colour and shape with linear probes, then is frozen;
2. projector + language model learn the world's base corpus, where every query is answered
   (harmful ones with hazard content): an unaligned base, saved with `save_pretrained`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules.collate import load_image
from datamodules.examples import Example, vlguard_examples
from datamodules.safety import DataFiles, SafetyDataModule
from models.backbone import build_tiny
from core.files import atomic_write, build_once
from lightning_modules.config.trainer import make_trainer


def corpus_texts(files: DataFiles, extra_words: list[str]) -> list[str]:
    """Every instruction and response the world can show the model (the tokenizer's corpus)."""
    texts = list(extra_words)
    for path in (files.general, files.train, files.val, files.test):
        if path is not None and Path(path).is_file():
            for ex in vlguard_examples(path, files.image_dir):
                texts += [ex.instruction, ex.response or ""]
    return texts


class VisionProbe(L.LightningModule):
    """Linear colour / shape probes on the patch features the projector will see."""

    def __init__(self, tower: nn.Module, dim: int, n_colors: int, n_shapes: int, lr: float):
        super().__init__()
        self.tower, self.lr = tower, lr
        self.color_head, self.shape_head = nn.Linear(dim, n_colors), nn.Linear(dim, n_shapes)

    def logits(self, pixel_values):
        feats = self.tower(pixel_values).last_hidden_state[:, 1:].mean(1)  # CLS dropped, as "default"
        return self.color_head(feats), self.shape_head(feats)

    def training_step(self, batch, batch_idx):
        pixels, colors, shapes = batch
        c, s = self.logits(pixels)
        loss = nn.functional.cross_entropy(c, colors) + nn.functional.cross_entropy(s, shapes)
        self.log("vision/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _probe_data(examples: list[Example], processor, colors: list[str], shapes: list[str]):
    """(pixel_values, colour index, shape index) for each distinct image, preprocessed once:
    the probe then trains on tensors, not on PIL decoding."""
    seen, items = set(), []
    for ex in examples:
        if ex.image not in seen:
            seen.add(ex.image)
            items.append(ex)
    pixels = torch.cat([processor.image_processor([load_image(ex) for ex in items[i:i + 256]],
                                                  return_tensors="pt")["pixel_values"]
                        for i in range(0, len(items), 256)])
    colors_t = torch.tensor([colors.index(ex.extra["world"]["color"]) for ex in items])
    shapes_t = torch.tensor([shapes.index(ex.extra["world"]["shape"]) for ex in items])
    return TensorDataset(pixels, colors_t, shapes_t)


@torch.no_grad()
def _probe_accuracy(probe: VisionProbe, data: TensorDataset) -> dict[str, float]:
    probe.eval()
    pixels, colors, shapes = data.tensors
    c, s = probe.logits(pixels)
    return {"color_accuracy": float((c.argmax(1) == colors).float().mean()),
            "shape_accuracy": float((s.argmax(1) == shapes).float().mean()), "n": len(colors)}


class OverallProgress(L.Callback):
    """One progress bar over both pre-training stages (each stage's own Trainer bar is off)."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bar.update(1)
        if isinstance(outputs, dict) and "loss" in outputs:
            self.bar.set_postfix(loss=f"{float(outputs['loss']):.3f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _quiet_trainer(max_steps: int, root: Path, progress: OverallProgress) -> L.Trainer:
    return make_trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(root), use_distributed_sampler=False,
                        enable_progress_bar=False, callbacks=[progress])


def base_cache_dir(cfg, files: DataFiles) -> Path:
    """Keyed by the base corpus's bytes, not the whole world: worlds that differ only in their
    safety set (e.g. a sweep over rho) share one base."""
    corpus = hashlib.sha256(Path(files.general).read_bytes()).hexdigest()
    # Everything stage 2 reads from the run config besides `base` (it trains through SFTModule
    # and SafetyDataModule): the AdamW settings and how images are shown.
    optim = {k: OmegaConf.to_container(cfg.optim).get(k) for k in ("weight_decay", "betas", "warmup_ratio")}
    key = {"tiny": OmegaConf.to_container(cfg.model.tiny), "corpus": corpus,
           "base": {k: v for k, v in OmegaConf.to_container(cfg.base).items() if k != "cache_dir"},
           "optim": optim, "image_mode": cfg.data.image_mode, "version": 2}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.base.cache_dir) / f"tiny-{digest}"


def ensure_tiny_base(cfg, files: DataFiles) -> Path:
    """Path of the cached base for this world and config, training it first if needed."""
    # Built in a temporary directory and renamed into place; a concurrent builder of the same base
    # waits for this one and reuses it.
    return build_once(base_cache_dir(cfg, files), lambda tmp: _build_tiny_base(cfg, files, tmp), "config.json")


def _build_tiny_base(cfg, files: DataFiles, tmp: Path) -> None:
    from datamodules.mirage_world import iter_texts, load_world_config
    from lightning_modules.methods.sft import SFTModule

    world = load_world_config(files.world_dir)
    L.seed_everything(cfg.base.seed, workers=True)
    # The world's whole vocabulary (every phrase under every cue), not just this world's splits.
    model, processor = build_tiny(cfg.model.tiny, iter_texts(files.world_dir))

    # Stage 1: vision tower.
    colors, shapes = list(world.colors), list(world.shapes)
    train_rows = _probe_data(vlguard_examples(files.general, files.image_dir), processor, colors, shapes)
    val_rows = _probe_data(vlguard_examples(files.val, files.image_dir), processor, colors, shapes)
    tower = model.model.vision_tower
    probe = VisionProbe(tower, tower.config.hidden_size, len(colors), len(shapes), cfg.base.vision_lr)
    loader = DataLoader(train_rows, batch_size=128, shuffle=True)
    progress = OverallProgress(cfg.base.vision_steps + cfg.base.steps, "pre-training the tiny base")
    _quiet_trainer(cfg.base.vision_steps, tmp, progress).fit(probe, loader)
    report = _probe_accuracy(probe, val_rows)
    progress.bar.write(f"vision tower: colour accuracy {report['color_accuracy']:.3f}, "
          f"shape accuracy {report['shape_accuracy']:.3f} on {report['n']} held-out images")

    # Stage 2: projector + language model on the base corpus, vision tower frozen.
    base_cfg = copy.deepcopy(cfg)
    base_cfg.method = {"name": "sft"}
    base_cfg.optim.lr, base_cfg.optim.scheduler = cfg.base.lr, "cosine"
    # The base is built and cached in fp32 whatever the run's model.dtype (it is loaded at that dtype),
    # so its optimizer is torch's AdamW on fp32 weights: the cache key need not carry the update path.
    base_cfg.optim.master_weights = "fp32"
    base_cfg.data.batch_size = cfg.base.batch_size
    for name, param in model.named_parameters():
        param.requires_grad_("vision_tower" not in name)
    model.train()  # the probe's accuracy check left the tower in eval mode
    module = SFTModule(model, processor, base_cfg)
    base_files = DataFiles(train=files.general, val=files.val, test=None, image_dir=files.image_dir,
                           compliance_cue=files.compliance_cue, refusal_cue=files.refusal_cue)
    data = SafetyDataModule(base_cfg.data, base_files, processor, seed=cfg.base.seed)
    _quiet_trainer(cfg.base.steps, tmp, progress).fit(module, data)
    progress.close()

    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    atomic_write(tmp / "vision_report.json", json.dumps(report, indent=1), what="vision report", durable=False)
