"""What `fit` leaves in <run_dir>/model, loadable from any working directory:

- full fine-tuning: the model and processor (`AutoModelForImageTextToText.from_pretrained(dir)`);
- LoRA: the adapter and processor (`peft.AutoPeftModel.from_pretrained(dir)`; the adapter config names
  the base class), whose `base_model_name_or_path` is the base's Hugging Face id or an absolute
  path -- never a path relative to the directory the run started in. A base built from config (the
  toy models) is saved beside it in <run_dir>/base_model; with `export.merge_lora` the merged full
  model goes to model/ and the adapter to adapter/;
- a model card (README.md) with the method, data, hyperparameters and the final test metrics.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import OmegaConf

from core.files import atomic_write, io_error
from metrics.gaps import GAPS, safety_gaps
from lightning_modules.methods.unlearning import is_peft
from models.backbone import is_built_from_config


def base_model_reference(name_or_path: str) -> Optional[str]:
    """The base as a loader anywhere can find it: an absolute path or a hub id (None: built from config)."""
    if is_built_from_config(name_or_path):
        return None
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else name_or_path


def save_model(module, cfg, run_dir: Path, state_dict=None) -> Path:
    """Weights and processor to <run_dir>/model (rank 0; `state_dict`: gathered sharded weights),
    published whole: written next to it, then renamed over the old one (a full disk ends in one
    line and leaves the previous model/ as it was)."""
    target = run_dir / "model"
    tmp = run_dir / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model(module, cfg, run_dir, tmp, state_dict)
        if target.exists():
            old = run_dir / f".model.old-{os.getpid()}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except OSError as err:
        raise io_error("model", target, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_model(module, cfg, run_dir: Path, target: Path, state_dict) -> None:
    model, processor = module.model, module.processor
    if is_peft(model):
        base = base_model_reference(cfg.model.name_or_path)
        if base is None:  # nothing to download it from: the untrained base travels with the adapter
            base_dir = run_dir / "base_model"
            if state_dict is None:
                copy.deepcopy(model).unload().save_pretrained(base_dir)
            else:  # sharded weights: rank 0 holds only the gathered state, from which the frozen base is read
                save_base_from_state(model, state_dict, base_dir)
            processor.save_pretrained(base_dir)
            base = str(base_dir.resolve())
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = base
    model.save_pretrained(target, state_dict=state_dict)
    processor.save_pretrained(target)


def save_base_from_state(model, state_dict: dict, target: Path) -> None:
    """The frozen base of a peft `model` as a transformers checkpoint, from its full state dict
    (peft's names: `base_model.model.` prefix, `.base_layer.` inside adapted layers, `lora_*`
    tensors, `modules_to_save` with the untrained `original_module`)."""
    from safetensors.torch import save_file

    prefix = "base_model.model."
    base = {}
    for name, tensor in state_dict.items():
        if "lora_" in name or ".modules_to_save." in name or not name.startswith(prefix):
            continue
        key = name[len(prefix):].replace(".base_layer.", ".").replace(".original_module.", ".")
        base[key] = tensor.contiguous().clone()
    target.mkdir(parents=True, exist_ok=True)
    model.get_base_model().config.save_pretrained(target)
    save_file(base, str(target / "model.safetensors"), metadata={"format": "pt"})


def unsharded_peft_copy(model, state_dict: dict):
    """A CPU copy of the peft `model` made of its gathered full state (rank 0 under sharded weights):
    built on the meta device, the gathered tensors assigned in place (no second copy of them), the
    non-persistent buffers (rotary tables; never sharded) taken from `model`."""
    import torch
    from peft import PeftModel

    base = model.get_base_model()
    with torch.device("meta"):
        copy_ = PeftModel(type(base)(base.config), next(iter(model.peft_config.values())))
    copy_.load_state_dict(state_dict, assign=True, strict=True)
    live = dict(model.named_buffers())
    for name, buffer in list(copy_.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            copy_.get_submodule(owner).register_buffer(attr, live[name].detach().cpu().clone(), persistent=False)
    return copy_.eval()


def merge_lora(module, run_dir: Path, state_dict: Optional[dict] = None) -> Path:
    """model/ becomes the merged full model; the adapter moves to adapter/. Call after the last use
    of the module: merging folds the adapter into the base weights in place. Under sharded weights
    (`state_dict`: the gathered full state, rank 0) a CPU copy made of it is merged instead."""
    target, adapter_dir = run_dir / "model", run_dir / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.move(str(target), str(adapter_dir))
    model = module.model if state_dict is None else unsharded_peft_copy(module.model, state_dict)
    merged = model.merge_and_unload()
    merged.save_pretrained(target)
    module.processor.save_pretrained(target)
    return target


def _yaml(node) -> str:
    return OmegaConf.to_yaml(node).strip()


def _loading_code(merged: bool, lora: bool) -> tuple[str, str]:
    """(what the directory holds, the code that loads it)."""
    if lora and not merged:
        return ("a LoRA adapter (base model recorded in adapter_config.json)",
                "from peft import AutoPeftModel\nfrom transformers import AutoProcessor\n"
                "model = AutoPeftModel.from_pretrained(PATH)\nprocessor = AutoProcessor.from_pretrained(PATH)")
    kind = "the full model" + (" (LoRA adapter merged; the adapter itself is in ../adapter)" if merged else "")
    return kind, ("from transformers import AutoModelForImageTextToText, AutoProcessor\n"
                  "model = AutoModelForImageTextToText.from_pretrained(PATH)\n"
                  "processor = AutoProcessor.from_pretrained(PATH)")


def _results_section(cfg, results: Optional[pd.DataFrame]) -> list[str]:
    """The test table and the mirage gaps (metrics.gaps) of the card."""
    if results is None or results.empty:
        return ["Not evaluated (`eval.test_at_end=false`)."]
    lines = ["Greedy answers to the four eval sets; refusal by keyword preset "
             f"`{cfg.eval.refusal_preset}`, harmful compliance by judge `{cfg.eval.judge}` "
             "(ASR + IR + refusal rate = 1 on every set).", "",
             results.to_markdown(floatfmt=".3f", missingval="–"), ""]
    gaps = safety_gaps({name: row.dropna().to_dict() for name, row in results.iterrows()})
    return lines + [f"- {name} ({GAPS[name][2]} of {GAPS[name][0]} - {GAPS[name][1]}): {value:+.3f}"
                    for name, value in gaps.items()]


def model_card(cfg, results: Optional[pd.DataFrame], merged: bool, lora: bool, base: Optional[str] = None,
               model_type: str = "") -> str:
    """README.md of the exported model: what it is, how it was made, what it scored, how to load it.
    `base`: the base recorded in the adapter config (default: from `model.name_or_path`)."""
    base = base or base_model_reference(cfg.model.name_or_path) or f"{cfg.model.name_or_path} (random weights)"
    method = cfg.method.name
    kind, load = _loading_code(merged, lora)
    keys = ("kind", "world", "train_file", "val_file", "test_file", "image_dir", "general_file", "general_ratio",
            "general_samples", "batch_size", "max_length")
    data = OmegaConf.masked_copy(cfg.data, [k for k in keys if cfg.data.get(k) not in (None, {}, "")])
    lines = [
        "---", "library_name: " + ("peft" if lora and not merged else "transformers"),
        "pipeline_tag: image-text-to-text", f"base_model: {base}", "tags: [safety-mirage, safety-alignment, "
        f"{method}]", "---", "",
        f"# {cfg.name}: {method} on {cfg.model.name_or_path}", "",
        f"Safety alignment of a vision-language model with **{method}**, trained by `python -m lightning_modules.fit` "
        f"of the safety-mirage package. This directory holds {kind} and its processor.", "",
        f"- base model: `{base}`",
        f"- fine-tuning: `{cfg.model.finetune}`" + (f" (r={cfg.model.lora.r}, alpha={cfg.model.lora.alpha}, "
                                                    f"targets `{cfg.model.lora.target_modules}`)" if lora else ""),
        f"- seed: {cfg.seed}", "",
        "## Method", "", "```yaml", _yaml(cfg.method), "```", "",
        "## Data", "", "```yaml", _yaml(data), "```", "",
        "## Hyperparameters", "", "```yaml", _yaml(OmegaConf.create({"optim": cfg.optim, "trainer": cfg.trainer})),
        "```", "",
        "## Results on the test split", "",
        *_results_section(cfg, results),
        "", "## Loading", "", "```python", load.replace("PATH", '"path/to/this/directory"'), "```", "",
    ]
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        lines += ["Without torchvision (which Qwen2-VL's video processor needs), load the processor with "
                  "`models.backbone.load_processor` of safety-mirage: the same processor, for images only.", ""]
    return "\n".join(lines)


def finish_export(module, cfg, run_dir: Path, results: Optional[pd.DataFrame], weights: Optional[dict] = None) -> Path:
    """After the test: merge the adapter if asked, then write the model card (rank 0). `weights`:
    the gathered full state when FSDP / ZeRO-3 shard the weights (rank 0 then merges a copy made of it)."""
    lora = is_peft(module.model)
    merged = bool(cfg.export.merge_lora) and lora
    target = merge_lora(module, run_dir, weights) if merged else run_dir / "model"
    if cfg.export.model_card:
        base = next(iter(module.model.peft_config.values())).base_model_name_or_path if lora else None
        card = model_card(cfg, results, merged, lora, base, module.model.config.model_type)
        atomic_write(target / "README.md", card, what="model card")
    return target
