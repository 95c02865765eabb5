"""Convert a LLaVA checkpoint in its ORIGINAL layout (haotian-liu/LLaVA: `liuhaotian/llava-v1.5-7b`,
VLGuard's `ys-zong/llava-v1.5-7b-Mixed` / `-Posthoc`, the Safety-Mirage release) to Hugging Face's
`LlavaForConditionalGeneration`, offline, so that `fit` and `evaluate` load it like any HF checkpoint.

    python -m models.convert_llava --src DIR --out DIR --vision-tower CLIP_DIR [--base DIR]

An original checkpoint is a `LlavaLlamaForCausalLM` config.json (Llama fields + `mm_*` keys), weights
under `model.layers.*`, `model.mm_projector.0/2.*`, `lm_head.*`, and the tokenizer files. It names
its CLIP vision tower (`mm_vision_tower`) instead of carrying its weights, so the tower comes from a
local CLIP directory (`--vision-tower`). A `-lora` checkpoint is LLaVA's LoRA output (peft adapter +
`non_lora_trainables.bin` holding the projector): merged onto `--base` first, as LLaVA's
`scripts/merge_lora_weights.py` does through `llava/model/builder.py` (lines 52-85). A stage-1
pretraining output (config.json + `mm_projector.bin`) with `--base` set to its language model
(Vicuna) gives the model LLaVA-1.5's instruction tuning starts from (builder.py lines 87-103).

Key names: transformers' own converter (`models/llava/convert_llava_weights_to_hf.py`, not shipped in
the installed wheel) renames the original keys to the legacy HF layout with KEYS_TO_MODIFY_MAPPING,
copied below; transformers' loading-time conversion mapping for llava (`conversion_mapping.py`) then
renames the legacy layout to the current modules. Unlike that converter, which downloads a tokenizer
and samples the new `<image>`/`<pad>` embeddings from N(mean, 1e-5·cov), this one builds the processor
from local files and gives the new rows the mean (the distribution's centre: deterministic).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from core.errors import UserError, cli_main
from core.files import writing

# transformers/models/llava/convert_llava_weights_to_hf.py (transformers main, commit 01080c6), verbatim.
KEYS_TO_MODIFY_MAPPING = {
    "model.vision_tower.": "",
    ".vision_resampler": "",  # all lmms-lab models do avg pooling, so no vision_resampler
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
}
# LLaVA's `mm_vision_select_feature` -> HF's vision_feature_select_strategy ("patch" drops CLIP's CLS).
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# config.json keys LLaVA adds to the Llama config (they are not Llama's).
LLAVA_ONLY_KEYS = ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
                   "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
                   "unfreeze_mm_vision_tower", "freeze_mm_vision_tower")
PAD_TO = 64  # the converter pads the resized vocabulary to a multiple of 64 (pad_shape)


def convert_state_dict_to_hf(state_dict: dict) -> dict:
    """Original LLaVA keys -> legacy HF Llava keys (the converter's function of the same name)."""
    new_state_dict = {}
    for key, value in state_dict.items():
        if key.endswith(".inv_freq"):
            continue
        for key_to_modify, new_key in KEYS_TO_MODIFY_MAPPING.items():
            if key_to_modify in key:
                key = key.replace(key_to_modify, new_key)
        new_state_dict[key] = value
    return new_state_dict


def read_llava_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json, not a LLaVA checkpoint directory")
    config = json.loads(path.read_text())
    archs = config.get("architectures") or []
    if "LlavaLlamaForCausalLM" not in archs and config.get("model_type") not in ("llava", "llava_llama"):
        raise UserError(f"{path}: architectures={archs}, model_type={config.get('model_type')!r}: not an original "
                        "LLaVA (LlavaLlamaForCausalLM) checkpoint")
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise UserError(f"{path}: mm_projector_type={config.get('mm_projector_type')!r}; only LLaVA-1.5's "
                        "mlp2x_gelu projector maps onto LlavaForConditionalGeneration")
    if config.get("mm_use_im_start_end"):
        raise UserError(f"{path}: mm_use_im_start_end=true (image start/end tokens) has no HF Llava equivalent")
    if config.get("mm_vision_select_feature", "patch") not in SELECT_FEATURE:
        raise UserError(f"{path}: mm_vision_select_feature={config['mm_vision_select_feature']!r}; "
                        f"choose one of: {', '.join(SELECT_FEATURE)}")
    return config


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that is not a plain tensor dict, a truncated file
        raise UserError(f"{path}: cannot be read as a state dict ({type(err).__name__})") from err


def load_weights(directory: Path) -> dict:
    """Every tensor of a checkpoint: sharded (an index names the files) or one file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise UserError(f"{index}: names {missing[0]}, which is not in {directory}")
            return {k: v for f in files for k, v in _load_file(directory / f).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _load_file(directory / name)
    raise UserError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index")


def text_config_of(config: dict):
    from transformers import LlamaConfig

    fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in LLAVA_ONLY_KEYS
              and k not in ("architectures", "model_type", "_name_or_path", "transformers_version")}
    return LlamaConfig(**fields)


def merge_lora(src: Path, base: Path, text_config) -> dict:
    """The base's weights with `src`'s LoRA adapter merged in and its non-LoRA trainables (the
    projector) loaded over them: LLaVA's builder.py lines 52-85, with peft's merge_and_unload."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    if not (src / "adapter_config.json").is_file():
        raise UserError(f"{src}: --base is given but {src} has no adapter_config.json (not a LoRA checkpoint)")
    weights = load_weights(base)
    language = {k: v for k, v in weights.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))}
    with torch.device("meta"):
        llama = LlamaForCausalLM(text_config)
    try:
        llama.load_state_dict(language, strict=False, assign=True)  # lm_head may be tied (absent)
        merged = PeftModel.from_pretrained(llama, str(src)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"cannot merge the LoRA adapter {src} onto {base}: {str(err).splitlines()[0]}") from err
    state = {k: v for k, v in merged.state_dict().items() if not v.is_meta}
    state.update({k: v for k, v in weights.items() if k.startswith(("model.mm_projector", "model.vision_tower"))})
    trainables = src / "non_lora_trainables.bin"
    if trainables.is_file():
        extra = _load_file(trainables)
        # builder.py lines 76-78: strip peft's "base_model." and the doubled "model." prefix.
        extra = {(k[11:] if k.startswith("base_model.") else k): v for k, v in extra.items()}
        if any(k.startswith("model.model.") for k in extra):
            extra = {(k[6:] if k.startswith("model.") else k): v for k, v in extra.items()}
        state.update(extra)
    return state


def projector_onto_base(src: Path, base: Path) -> dict:
    """A stage-1 (pretraining) output, config.json + mm_projector.bin, on its language model: the
    starting point of LLaVA-1.5's instruction tuning (builder.py lines 87-103; finetune.sh:5, :10)."""
    path = src / "mm_projector.bin"
    if not path.is_file():
        raise UserError(f"--base is given but {src} has neither adapter_config.json (a LoRA) nor mm_projector.bin "
                        "(a pretraining output)")
    projector = {(k if k.startswith("model.") else f"model.{k}"): v for k, v in _load_file(path).items()}
    if not any(k.startswith("model.mm_projector.") for k in projector):
        raise UserError(f"{path}: no mm_projector weights")
    weights = load_weights(base)
    weights.update(projector)
    return weights


def _with_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` grown to `rows` rows, the new ones the mean of the old."""
    if rows <= weight.shape[0]:
        return weight
    fill = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, fill], dim=0)


def build_processor(tokenizer, clip_dir: str, patch_size: int, strategy: str):
    from transformers import AutoImageProcessor, LlavaProcessor

    from models.chat_templates import LLAVA_1_5

    image_processor = AutoImageProcessor.from_pretrained(clip_dir, local_files_only=True, backend="pil")
    # num_additional_image_tokens=1: the CLS token the "default" strategy drops, else the count is off by one.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                          chat_template=LLAVA_1_5)


def load_state(src: Path, base: Optional[Path], text_config) -> dict:
    """The checkpoint's weights under LLaVA's original names: `src` alone, a LoRA merged onto `base`,
    or a stage-1 projector on `base`."""
    is_lora = (src / "adapter_config.json").is_file()
    if base is None and is_lora:
        raise UserError(f"{src} is a LoRA checkpoint: it needs --base DIR, the checkpoint it was trained on")
    state = load_weights(src) if base is None else merge_lora(src, base, text_config) if is_lora \
        else projector_onto_base(src, base)
    if "model.mm_projector.0.weight" not in state:
        raise UserError(f"{src}: no model.mm_projector.0.weight among its weights (or its base's)")
    state.pop("model.image_newline", None)
    if "lm_head.weight" not in state:  # tied embeddings (as the converter does)
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    return state


def add_vision_tower(state: dict, clip: str, config: dict, src: Path):
    """The CLIP vision config, and its weights added to `state` unless the checkpoint carries them."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        vision_config = CLIPVisionConfig.from_pretrained(clip, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"vision tower '{clip}': not a local CLIP directory or cached hub id "
                        "(pass --vision-tower DIR)") from err
    if vision_config.hidden_size != config.get("mm_hidden_size", vision_config.hidden_size):
        raise UserError(f"vision tower '{clip}': hidden size {vision_config.hidden_size}, but {src}/config.json "
                        f"has mm_hidden_size={config['mm_hidden_size']}")
    if not any(k.startswith("model.vision_tower.") for k in state):  # the usual case
        dtype = state["model.mm_projector.0.weight"].dtype
        tower = CLIPVisionModel.from_pretrained(clip, local_files_only=True, dtype=dtype)
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    return vision_config


def load_tokenizer(src: Path, base: Optional[Path]):
    """The checkpoint's tokenizer (a LoRA or stage-1 directory has none: its base's), with the
    "<image>" placeholder and "<pad>" token HF Llava needs (the converter adds both)."""
    from transformers import AddedToken, AutoTokenizer

    directory = src if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) or base is None else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{directory}: no loadable tokenizer files") from err
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    if "<pad>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def to_current_layout(model, state: dict, src: Path) -> dict:
    """Original keys -> the converter's legacy HF keys -> the current modules (transformers' own
    loading-time renames); every weight must fit the model's config."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    target = model.state_dict()
    converted = {rename_source_key(key, renamings, converters, model.base_model_prefix, target)[0]: value
                 for key, value in convert_state_dict_to_hf(state).items()}
    missing, unexpected = sorted(set(target) - set(converted)), sorted(set(converted) - set(target))
    if missing:
        raise UserError(f"{src}: weights do not fit LlavaForConditionalGeneration: missing {missing[0]} "
                        f"(+{len(missing) - 1} more)")
    if unexpected:
        raise UserError(f"{src}: weights do not fit LlavaForConditionalGeneration: unexpected {unexpected[0]}")
    for key, value in converted.items():
        if value.shape != target[key].shape:
            raise UserError(f"{src}: {key} has shape {tuple(value.shape)}, the config expects "
                            f"{tuple(target[key].shape)}")
    return converted


def convert(src: Path, out: Path, vision_tower: Optional[str] = None, base: Optional[Path] = None) -> Path:
    """Write `src` (original LLaVA layout; with `base`: a LoRA merged onto it, or a stage-1 projector
    put on it) to `out` as a LlavaForConditionalGeneration with its processor, in safetensors."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    for name, directory in (("--src", src), ("--base", base)):
        if directory is not None and not directory.is_dir():
            raise UserError(f"{name} {directory}: no such directory")
    config = read_llava_config(src)
    text_config = text_config_of(config)
    state = load_state(src, base, text_config)
    clip = vision_tower or config.get("mm_vision_tower")
    vision_config = add_vision_tower(state, clip, config, src)
    tokenizer = load_tokenizer(src, base)
    rows = max(state["model.embed_tokens.weight"].shape[0], -(-len(tokenizer) // PAD_TO) * PAD_TO)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = _with_rows(state[key], rows)
    text_config.vocab_size = rows
    text_config.pad_token_id = tokenizer.pad_token_id

    strategy = SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")]
    llava_config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                               image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                               vision_feature_layer=config.get("mm_vision_select_layer", -2),
                               vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    model.load_state_dict(to_current_layout(model, state, src), strict=True, assign=True)
    model.config.dtype = state["model.embed_tokens.weight"].dtype
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    processor = build_processor(tokenizer, clip, vision_config.patch_size, strategy)
    with writing("converted model", out):  # a full disk or read-only folder: one line
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        processor.save_pretrained(str(out))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.convert_llava", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="original-format LLaVA checkpoint (or LoRA) directory")
    parser.add_argument("--out", type=Path, required=True, help="where the Hugging Face checkpoint is written")
    parser.add_argument("--base", type=Path, help="for a LoRA checkpoint: the checkpoint it was trained from; for a "
                        "stage-1 output (mm_projector.bin): its language model (Vicuna)")
    parser.add_argument("--vision-tower", help="local CLIP directory (default: the config's mm_vision_tower, "
                        "from the local Hugging Face cache)")
    args = parser.parse_args(argv)
    out = convert(args.src, args.out, args.vision_tower, args.base)
    print(f"wrote {out} (LlavaForConditionalGeneration + processor, safetensors)")


if __name__ == "__main__":
    cli_main(main)()
