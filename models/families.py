"""Toy-size models of the real VLM families, built from config with random weights and no download.

`model.name_or_path: tiny-llava | tiny-llava-next | tiny-qwen2-vl | tiny-qwen2.5-vl` builds the
family's real model class (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration) at the sizes of `model.tiny`,
with the family's real processor class and image processor (the `*Pil` ones: no torchvision), a
byte-level BPE tokenizer trained offline that carries the family's special tokens, and the released
chat template. Everything downstream (collation, labels, generation, LoRA targets, RMU layers,
export) then runs the code path a real checkpoint of that family runs.

Qwen2-VL's own processor cannot be constructed without torchvision (its video processor needs it),
so `QwenVLImageTextProcessor` is Qwen2VLProcessor with the video side removed: the same image-token
expansion (`image_grid_thw.prod() // merge_size**2` pads per image) and `mm_token_type_ids`.
Where torchvision is installed, real checkpoints load the real processor through AutoProcessor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from models import chat_templates
from models.tiny import TinyConfig

LLAMA_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "image": "<image>"}
QWEN_SPECIALS = {"pad": "<|endoftext|>", "eos": "<|im_end|>", "im_start": "<|im_start|>",
                 "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
                 "image": "<|image_pad|>", "video": "<|video_pad|>"}
MERGE_SIZE = 2  # Qwen2-VL merges 2x2 patches into one language-model token


class QwenVLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor for images only: the image processor and the tokenizer, without the video
    processor that needs torchvision. Calls, chat templates and `mm_token_type_ids` are the parent's."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        # Saved as the family's processor: where torchvision is installed, AutoProcessor loads the real one.
        return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}


def train_bpe_tokenizer(texts: Iterable[str], specials: dict[str, str], add_bos: bool,
                        vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on `texts` (milliseconds): any text encodes (no
    unknown token) and decodes back exactly, and every special token is one id."""
    tokens = list(dict.fromkeys(specials.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=tokens, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(tokens)
    if add_bos:  # Llama and Mistral tokenizers start every sequence with <s>; Qwen's add nothing
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials['bos']} $A", special_tokens=[(specials["bos"], tok.token_to_id(specials["bos"]))])
    extra = {"image_token": specials["image"]}
    if "video" in specials:
        extra.update(video_token=specials["video"], vision_bos_token=specials["vision_start"],
                     vision_eos_token=specials["vision_end"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=specials["pad"], eos_token=specials["eos"],
        bos_token=specials.get("bos"), unk_token=specials.get("unk"), extra_special_tokens=extra,
        padding_side="left")


def _llama_text(tokenizer, cfg: TinyConfig, config_class=LlamaConfig):
    return config_class(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                        num_key_value_heads=cfg.num_heads, vocab_size=len(tokenizer),
                        max_position_embeddings=cfg.max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _clip(cfg: TinyConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_hidden_size * 2,
                            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size)


def _pinpoints(cfg: TinyConfig) -> list[list[int]]:
    s = cfg.image_size  # LLaVA-NeXT's grid at 336 px is [[336, 672], [672, 336], [672, 672], ...]
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def build_llava(tokenizer, cfg: TinyConfig):
    # vision_feature_layer -2 and the "default" strategy (CLS dropped) as in llava-1.5-7b-hf.
    config = LlavaConfig(vision_config=_clip(cfg), text_config=_llama_text(tokenizer, cfg),
                         image_token_id=tokenizer.image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                            crop_size={"height": cfg.image_size, "width": cfg.image_size})
    # num_additional_image_tokens=1: the CLS token the "default" strategy drops, else the count is off by one.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_templates.LLAVA_1_5)
    return LlavaForConditionalGeneration(config), processor


def build_llava_next(tokenizer, cfg: TinyConfig):
    config = LlavaNextConfig(vision_config=_clip(cfg), text_config=_llama_text(tokenizer, cfg, MistralConfig),
                             image_grid_pinpoints=_pinpoints(cfg), image_token_id=tokenizer.image_token_id,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             pad_token_id=tokenizer.pad_token_id)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_grid_pinpoints=_pinpoints(cfg))
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=chat_templates.LLAVA_NEXT_MISTRAL)
    return LlavaNextForConditionalGeneration(config), processor


def _mrope_section(cfg: TinyConfig) -> list[int]:
    """Temporal / height / width split of the rotary half-dimension (Qwen2-VL-7B: 16, 24, 24 of 64)."""
    half = cfg.hidden_size // cfg.num_heads // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_text(tokenizer, cfg: TinyConfig) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(cfg)},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def _qwen_processor(tokenizer, cfg: TinyConfig) -> QwenVLImageTextProcessor:
    factor = cfg.patch_size * MERGE_SIZE  # images are resized to multiples of this
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size, merge_size=MERGE_SIZE, temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": cfg.image_size * cfg.image_size})
    return QwenVLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_templates.QWEN2_VL)


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids(QWEN_SPECIALS["image"]), video_token_id=ids(QWEN_SPECIALS["video"]),
                vision_start_token_id=ids(QWEN_SPECIALS["vision_start"]),
                vision_end_token_id=ids(QWEN_SPECIALS["vision_end"]))


def build_qwen2_vl(tokenizer, cfg: TinyConfig):
    vision = dict(depth=cfg.vision_layers, embed_dim=cfg.vision_hidden_size, hidden_size=cfg.hidden_size,
                  num_heads=cfg.vision_heads, mlp_ratio=2, patch_size=cfg.patch_size,
                  spatial_merge_size=MERGE_SIZE, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=_qwen_text(tokenizer, cfg), vision_config=vision, **_qwen_ids(tokenizer))
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(tokenizer, cfg)


def build_qwen2_5_vl(tokenizer, cfg: TinyConfig):
    vision = dict(depth=cfg.vision_layers, hidden_size=cfg.vision_hidden_size,
                  intermediate_size=cfg.vision_hidden_size * 2, num_heads=cfg.vision_heads,
                  patch_size=cfg.patch_size, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2,
                  out_hidden_size=cfg.hidden_size, window_size=cfg.patch_size * MERGE_SIZE * 2,
                  fullatt_block_indexes=[cfg.vision_layers - 1])
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tokenizer, cfg), vision_config=vision, **_qwen_ids(tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(tokenizer, cfg)


@dataclass(frozen=True)
class ToyFamily:
    """A released family at toy size: its builder, its special tokens and its end-of-turn token."""

    build: Callable
    specials: dict
    add_bos: bool
    released_as: str  # the checkpoint whose template and tokens this mirrors


TOY_FAMILIES = {
    "tiny-llava": ToyFamily(build_llava, LLAMA_SPECIALS, True, "llava-hf/llava-1.5-7b-hf"),
    "tiny-llava-next": ToyFamily(build_llava_next, LLAMA_SPECIALS, True, "llava-hf/llava-v1.6-mistral-7b-hf"),
    "tiny-qwen2-vl": ToyFamily(build_qwen2_vl, QWEN_SPECIALS, False, "Qwen/Qwen2-VL-2B-Instruct"),
    "tiny-qwen2.5-vl": ToyFamily(build_qwen2_5_vl, QWEN_SPECIALS, False, "Qwen/Qwen2.5-VL-3B-Instruct"),
}


def build_toy(name: str, cfg: TinyConfig | dict, texts: Iterable[str]):
    """(model, processor) of toy family `name`, the tokenizer trained on `texts` and the template's words."""
    cfg = cfg if isinstance(cfg, TinyConfig) else TinyConfig(**cfg)
    family = TOY_FAMILIES[name]
    words = ["USER: ASSISTANT: [INST] [/INST] system user assistant You are a helpful assistant."]
    tokenizer = train_bpe_tokenizer(list(texts) + words, family.specials, family.add_bos)
    model, processor = family.build(tokenizer, cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor
