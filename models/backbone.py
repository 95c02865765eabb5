"""One function that builds the model and processor a run trains: a Hugging Face image-text-to-text
model through the Auto classes, the tiny LLaVA of the Mirage World, or a toy-size model of a real
family (models/families.py) from config; then the end-of-turn token and the training mode."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from core.errors import UserError
from models.families import TOY_FAMILIES, QwenVLImageTextProcessor, build_toy
from models.tiny import TinyConfig, build_tiny_model, build_tiny_processor, train_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
FINETUNE_MODES = ("full", "lora", "projector")
# The vision encoder and the projector of each family: LLaVA's `vision_tower` and
# `multi_modal_projector`; Qwen2-VL's `visual` with its `visual.merger` as the projector.
VISION = re.compile(r"(^|\.)(vision_tower|visual)\.")
PROJECTOR = re.compile(r"(^|\.)(multi_modal_projector|visual\.merger)\.")


def is_built_from_config(name_or_path: str) -> bool:
    """True for the models that exist only as code (no weights to download): their tokenizer is
    trained on the run's texts."""
    return name_or_path == "tiny" or name_or_path in TOY_FAMILIES


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
        processor = load_processor(model_cfg.name_or_path, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(
            model_cfg.name_or_path, dtype=DTYPES[model_cfg.dtype],
            attn_implementation=model_cfg.attn_implementation, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_original_llava(model_cfg.name_or_path):
            first = "it is in LLaVA's original format: convert it with python -m models.convert_llava"
        raise UserError(f"cannot load model.name_or_path='{model_cfg.name_or_path}': {first}") from err
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def is_original_llava(name_or_path: str) -> bool:
    """A local checkpoint written by LLaVA's own code (LlavaLlamaForCausalLM), which the Auto classes cannot load."""
    import json

    config = Path(name_or_path) / "config.json"
    try:
        return "LlavaLlamaForCausalLM" in (json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return False


def load_processor(name_or_path: str, **kwargs):
    """AutoProcessor; for a Qwen2-VL / Qwen2.5-VL checkpoint on a machine without torchvision (its
    video processor needs it, so AutoProcessor fails or returns the bare tokenizer), the same
    processor for images only."""
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    except (ImportError, TypeError, ValueError, OSError) as err:
        processor, error = None, err
    if processor is not None and hasattr(processor, "image_processor"):
        return processor
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type
    except (OSError, ValueError):
        model_type = None
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return QwenVLImageTextProcessor.from_pretrained(name_or_path, **kwargs)
    if processor is None:
        raise error
    raise ValueError(f"{name_or_path} has no image processor: not an image-text-to-text model")


def set_end_of_turn(model, processor, end_token: Optional[str]) -> None:
    """The token that closes an assistant turn becomes the tokenizer's EOS (the collator labels it
    once after every response) and a stop token of generation. Default: the tokenizer's EOS."""
    tokenizer = processor.tokenizer
    if end_token:
        if end_token not in tokenizer.get_vocab():
            raise UserError(f"model.end_token='{end_token}' is not a token of this tokenizer")
        tokenizer.eos_token = end_token
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token: set model.end_token to the token that ends a turn")
    stops = model.generation_config.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    model.generation_config.eos_token_id = list(dict.fromkeys([tokenizer.eos_token_id, *stops]))


def is_trainable(name: str, model_cfg) -> bool:
    """Whether the parameter `name` trains under `model.finetune` -- the one rule, for alignment and
    for every later step that trains the same parameters (the relearning probe): full: everything
    but (by default) the vision encoder; projector: the projector only; lora: the adapters and the
    `lora.modules_to_save` copies peft makes."""
    if model_cfg.finetune == "lora":
        return "lora_" in name or "modules_to_save" in name
    if model_cfg.finetune == "projector":
        return bool(PROJECTOR.search(name))
    return not (model_cfg.freeze_vision and VISION.search(name) and not PROJECTOR.search(name))


def decoder_layers(model) -> tuple[str, "torch.nn.ModuleList"]:
    """(qualified name, module list) of the language model's decoder layers, under peft too."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n.endswith("layers")]
    preferred = [(n, m) for n, m in lists if n.endswith("language_model.layers")]
    text = preferred or [(n, m) for n, m in lists if not re.search(r"vision|visual", n)]
    if len(text) != 1:
        raise UserError(f"cannot find the language model's decoder layers (candidates: {[n for n, _ in lists]})")
    return text[0]


def narrow_trainable(model, layers: Optional[list[int]], pattern: str, extras: list[str]) -> list[str]:
    """Of what `model.finetune` already trains, keep `pattern` inside decoder `layers` (None: every
    layer) and any parameter matching one of `extras` (e.g. the projector); freeze the rest. The
    names kept. RMU's selection (the official one: mlp.down_proj of layers 5-7 + the projector)."""
    layers_name, _ = decoder_layers(model)
    which = r"\d+" if layers is None else "|".join(map(str, layers))
    in_layers = re.compile(rf"(^|\.){re.escape(layers_name)}\.({which})\.")
    inside, others = re.compile(pattern), [re.compile(x) for x in extras]
    chosen = []
    for name, param in model.named_parameters():
        keep = param.requires_grad and ((bool(in_layers.search(name)) and bool(inside.search(name)))
                                        or any(x.search(name) for x in others))
        param.requires_grad_(keep)
        chosen += [name] if keep else []
    return chosen


def mark_trainable(model, model_cfg) -> list[str]:
    """Set requires_grad by `is_trainable`; the names of the trainable parameters."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, model_cfg) and param.is_floating_point())
        names += [name] if param.requires_grad else []
    return names


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
    mark_trainable(model, model_cfg)
    return model


def build_backbone(model_cfg, tiny_texts: Optional[Iterable[str]] = None):
    """(model, processor) for `model_cfg`, trainable parameters set by `model.finetune`."""
    name = model_cfg.name_or_path
    if is_built_from_config(name) and tiny_texts is None:
        raise UserError(f"model.name_or_path={name} needs texts to train its tokenizer (a data source)")
    if name == "tiny":
        model, processor = build_tiny(model_cfg.tiny, tiny_texts)
    elif name in TOY_FAMILIES:
        model, processor = build_toy(name, model_cfg.tiny, tiny_texts)
    if is_built_from_config(name) and DTYPES.get(model_cfg.dtype, "auto") != "auto":
        model = model.to(DTYPES[model_cfg.dtype])  # built in fp32 from the seed, then stored like a checkpoint
    else:
        if not Path(name).exists() and "/" not in name:
            toys = ", ".join(["tiny", *TOY_FAMILIES])
            raise UserError(f"model.name_or_path='{name}' is neither a toy model ({toys}), "
                            "a local directory nor a Hugging Face id")
        model, processor = load_pretrained(model_cfg)
    set_end_of_turn(model, processor, model_cfg.get("end_token"))
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode; Lightning expects training mode at fit start
    return apply_finetune_mode(model, model_cfg), processor
