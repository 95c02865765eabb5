"""One function that builds the model and processor a run trains: a Hugging Face image-text-to-text
model through the Auto classes, or the tiny LLaVA from config; then the training mode."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from core.errors import UserError
from models.tiny import TinyConfig, build_tiny_model, build_tiny_processor, train_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
FINETUNE_MODES = ("full", "lora", "projector")


def build_tiny(tiny_cfg, texts: Iterable[str]):
    """A fresh tiny LLaVA and its processor, with a tokenizer trained on `texts`."""
    cfg = TinyConfig(**tiny_cfg) if not isinstance(tiny_cfg, TinyConfig) else tiny_cfg
    tokenizer = train_tokenizer(texts)
    return build_tiny_model(tokenizer, cfg), build_tiny_processor(tokenizer, cfg)


def load_pretrained(model_cfg):
    """Model + processor from a Hugging Face id or a local `save_pretrained` directory."""
    if model_cfg.dtype not in DTYPES:
        raise UserError(f"unknown model.dtype '{model_cfg.dtype}'; choose one of: {', '.join(DTYPES)}")
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=bool(model_cfg.trust_remote_code))
    try:
        processor = AutoProcessor.from_pretrained(model_cfg.name_or_path, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(
            model_cfg.name_or_path, dtype=DTYPES[model_cfg.dtype],
            attn_implementation=model_cfg.attn_implementation, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model.name_or_path='{model_cfg.name_or_path}': {first}") from err
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def _set_trainable(model, pattern: str) -> None:
    regex = re.compile(pattern)
    for name, param in model.named_parameters():
        param.requires_grad_(bool(regex.search(name)))


def apply_finetune_mode(model, model_cfg):
    """full: everything but (by default) the vision tower; projector: the projector only;
    lora: peft LoRA adapters on the language model (plus `lora.modules_to_save`)."""
    mode = model_cfg.finetune
    if mode not in FINETUNE_MODES:
        raise UserError(f"unknown model.finetune '{mode}'; choose one of: {', '.join(FINETUNE_MODES)}")
    if mode == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if model_cfg.adapter_path:
            return PeftModel.from_pretrained(model, model_cfg.adapter_path, is_trainable=True)
        lora = model_cfg.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules,
                            modules_to_save=list(lora.modules_to_save) or None)
        return get_peft_model(model, config)
    if mode == "projector":
        _set_trainable(model, r"multi_modal_projector")
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(not (model_cfg.freeze_vision and "vision_tower" in name))
    return model


def build_backbone(model_cfg, tiny_texts: Optional[Iterable[str]] = None):
    """(model, processor) for `model_cfg`, trainable parameters set by `model.finetune`."""
    if model_cfg.name_or_path == "tiny":
        if tiny_texts is None:
            raise UserError("model.name_or_path=tiny needs texts to train its tokenizer (a data source)")
        model, processor = build_tiny(model_cfg.tiny, tiny_texts)
    else:
        if not Path(model_cfg.name_or_path).exists() and "/" not in model_cfg.name_or_path:
            raise UserError(f"model.name_or_path='{model_cfg.name_or_path}' is neither 'tiny', "
                            "a local directory nor a Hugging Face id")
        model, processor = load_pretrained(model_cfg)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode; Lightning expects training mode at fit start
    return apply_finetune_mode(model, model_cfg), processor
