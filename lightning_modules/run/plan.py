"""The run plan: what a `fit` config will do, printed before any weight is loaded.

A Hugging Face model is built on the meta device from its config (the hub's, or `model.hf_config`
shipped in configs/ when offline), a toy model on the meta device from its sizes. The method's own
choice of trainable parameters is applied to it (`narrow_for_plan`), the data rows are counted
without a processor, and the memory estimate is `models.memory`'s.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict

import torch

from core.errors import UserError
from core.paths import CONFIG_ROOT
from datamodules.forget_retain import PairSampler
from datamodules.safety import resolve_data_files
from lightning_modules.methods import get_method
from lightning_modules.run.assembly import accumulation_steps
from models.backbone import DTYPES, PROJECTOR, VISION, apply_finetune_mode, build_backbone, decoder_layers, \
    is_built_from_config
from lightning_modules.run.deepspeed_config import read_config
from models.memory import GiB, ModelShape, estimate_memory
from models.precision import AUTOCAST_PRECISIONS, CAST_PRECISIONS, offloads_optimizer, run_update_path, strategy_name

WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
REFERENCE_TEXT = {
    "cache": "cached reference NLL: one forward over the set(s) before the first update, kept in the checkpoint",
    "adapter": "LoRA disable_adapter: the same weights with the adapters off (a second forward per step)",
    "snapshot": "frozen copies of the modules owning trainable tensors, swapped in for the reference forward",
}


def plan_model(cfg):
    """The model as the run would train it (meta device for a Hugging Face model), trainable
    parameters set by `model.finetune` and the method."""
    name = cfg.model.name_or_path
    if is_built_from_config(name):  # on the meta device (a 7B-shaped toy too), its tokenizer (the vocabulary) a placeholder
        with torch.device("meta"):
            model, _ = build_backbone(cfg.model, ["plan"])
    else:
        from transformers import AutoConfig, AutoModelForImageTextToText

        try:
            config = AutoConfig.from_pretrained(name, revision=cfg.model.revision,
                                                trust_remote_code=bool(cfg.model.trust_remote_code))
        except (OSError, ValueError) as err:
            if not cfg.model.get("hf_config"):
                raise UserError(f"cannot read the config of model.name_or_path='{name}' ({str(err).splitlines()[0]}); "
                                "set model.hf_config to a shipped config.json") from err
            config = AutoConfig.from_pretrained(str(CONFIG_ROOT / cfg.model.hf_config))
        dtype = DTYPES[cfg.model.dtype] if cfg.model.dtype != "auto" else torch.bfloat16
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        model = apply_finetune_mode(model, cfg.model)
    get_method(cfg.method.name).narrow_for_plan(model, cfg)
    return model


def part_of(name: str) -> str:
    """The component a parameter belongs to, for the per-module table."""
    if "lora_" in name:
        return "LoRA adapters"
    if PROJECTOR.search(name):
        return "projector"
    if VISION.search(name):
        return "vision tower"
    if re.search(r"\.layers\.\d+\.", name):
        return "decoder layers"
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    return "other (norms)"


def trained_tensors(model) -> list[str]:
    """Trainable tensor names, layer indices folded: `...layers.{5-7}.mlp.down_proj.weight`."""
    folded: dict[str, list[int]] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            match = re.search(r"\.layers\.(\d+)\.", name)
            key = name if match is None else name[:match.start(1)] + "{}" + name[match.end(1):]
            folded[key] += [int(match.group(1))] if match else []
    return [key.replace("{}", "{" + layer_span(layers) + "}") if layers else key for key, layers in folded.items()]


def layer_span(layers: list[int]) -> str:
    """5 | 5-7 (consecutive) | 1,3,8."""
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def world_size(trainer_cfg) -> int:
    """Processes the Trainer will start: devices (a count, a list, or -1 / auto = the visible GPUs, 1
    where none is visible: pass trainer.devices=N to plan for N offline) x nodes."""
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices == -1 or devices == "auto":
        cpu = str(trainer_cfg.get("accelerator", "auto")) == "cpu"
        devices = 1 if cpu else (torch.cuda.device_count() or 1)
    elif not isinstance(devices, int):
        devices = len(devices) if not isinstance(devices, str) else len([d for d in devices.split(",") if d.strip()])
    return max(devices, 1) * int(trainer_cfg.get("num_nodes", 1))


def plan_strategy(trainer_cfg, world: int) -> tuple[str, bool, bool, str]:
    """(kind: single | ddp | zero2 | zero3 | fsdp, optimizer offloaded, parameters offloaded, in words)
    of `trainer.strategy` on `world` processes."""
    spec = trainer_cfg.get("strategy")
    name = strategy_name(spec)
    if name.startswith("deepspeed"):
        if hasattr(spec, "get"):
            config = spec.get("config")
            if config is not None:
                config = read_config(config)
                zero = config.get("zero_optimization") or {}
                stage = int(zero.get("stage", 0))
                opt = offloads_optimizer(config)
                par = str((zero.get("offload_param") or {}).get("device", "none")).lower() in ("cpu", "nvme")
            else:
                stage, opt, par = int(spec.get("stage", 2)), bool(spec.get("offload_optimizer")), \
                    bool(spec.get("offload_parameters"))
        else:  # Lightning's registered names: deepspeed (stage 2), deepspeed_stage_{1,2,3}[_offload]
            digits = [int(c) for c in name if c.isdigit()]
            stage = digits[0] if digits else 2
            opt, par = "offload" in name, "offload" in name and stage == 3
        kind = "zero3" if stage == 3 else "zero2"
        offload = " + optimizer" * opt + " + parameters" * par
        return kind, opt, par, f"DeepSpeed ZeRO-{stage}{' offload' + offload.replace(' + ', ', ', 1) if offload else ''}"
    if "fsdp" in name or name == "model_parallel":
        return "fsdp", False, False, "FSDP (fp32 shards)"
    if world > 1:
        return "ddp", False, False, "DDP"
    return "single", False, False, "one device"


def recipe_strategy(cfg, world: int):
    """The recipe's own choice for this device count (`strategy_by_gpus`: the largest count <= world)."""
    table = {int(k): str(v) for k, v in (cfg.get("strategy_by_gpus") or {}).items()}
    fitting = [k for k in table if k <= world]
    return (max(fitting), table[max(fitting)]) if fitting else (None, None)


def data_sizes(cfg, world: int) -> tuple[dict[str, str], int | None]:
    """Row counts by set, and the batches of one epoch per process (None when the data is not here)."""
    method = get_method(cfg.method.name)
    try:
        files = resolve_data_files(cfg.data)
        data = method.datamodule_class(cfg.data, files, None, seed=cfg.seed)
        sizes = {}
        if hasattr(data, "forget_candidates"):
            n_forget, n_retain = len(data.forget_candidates()), len(data.retain_examples())
            harvest = data.fr.forget_source == "harvest"
            n_gen = len(data.fr.get("generators") or [])
            makers = f"{n_gen} generator model(s)" if n_gen else "the base model"
            sizes["forget"] = (f"<= {n_forget} (harvested from {makers}: harmful answers kept)" if harvest
                               else str(n_forget))
            sizes["retain"] = str(n_retain)
            # the training sampler's epoch (over the longer set, or the retain set as the official trainer)
            rows = len(PairSampler(n_forget, n_retain, cfg.seed, 0, world, data.fr.get("epoch_over", "longer")))
        else:
            n_train = len(data.train_dataset())
            sizes["train"] = str(n_train)
            rows = n_train // world if world > 1 else n_train
        for split, path in (("val", files.val), ("test", files.test)):
            sets = data.eval_split(path)
            sizes[split] = ", ".join(f"{name} {len(examples)}" for name, examples in sets.items()) or "none"
        return sizes, math.ceil(rows / int(cfg.data.batch_size))
    except UserError as err:
        return {"rows": f"not counted here: {err}"}, None


def reference_of(cfg, model) -> tuple[str, int]:
    """(the reference strategy in words, parameters of a frozen copy)."""
    params = get_method(cfg.method.name).parse_params(cfg.method)
    mode = getattr(params, "reference", None)
    if mode is None:
        return "none (the method has no reference model)", 0
    lora = cfg.model.finetune == "lora" and not cfg.model.adapter_path
    if mode == "auto":
        mode = get_method(cfg.method.name).AUTO_REFERENCE[lora]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if getattr(params, "alpha", None) == 0:  # RMU without its retain activation term never runs it
        return f"{mode}, never run: method.alpha=0 (no retain activation term)", \
            trainable if mode == "snapshot" else 0
    text = REFERENCE_TEXT[mode]
    if mode == "cache" and getattr(params, "retain_npo_alpha", 0):
        text += " (forget and retain sets)"
    return f"{mode}: {text}", trainable if mode == "snapshot" else 0


def run_plan(cfg) -> str:
    """The plan of a `fit` config, as printed."""
    model = plan_model(cfg)
    method = cfg.method.name
    text_cfg = model.config.get_text_config()
    world = world_size(cfg.trainer)
    batch = int(cfg.data.batch_size)
    effective = cfg.data.get("effective_batch_size")
    accumulate = accumulation_steps(int(effective), batch, world) if effective else \
        int(cfg.trainer.get("accumulate_grad_batches", 1))
    sizes, batches = data_sizes(cfg, world)
    toy = " [toy model: vocabulary-sized tensors approximate]" if is_built_from_config(cfg.model.name_or_path) else ""
    lines = [f"run plan: {cfg.name} | method {method} | model {cfg.model.name_or_path} "
             f"({cfg.model.dtype}, finetune={cfg.model.finetune}){toy}"]
    lines += [f"  data: {k}: {v}" for k, v in sizes.items()]
    lines.append(f"  batch: {batch} per device x {accumulate} accumulated x {world} process(es) = "
                 f"{batch * accumulate * world} effective" + (f" (data.effective_batch_size={effective})"
                                                              if effective else ""))
    max_steps, epochs = int(cfg.trainer.get("max_steps", -1)), int(cfg.trainer.get("max_epochs") or 1)
    if batches is not None:
        per_epoch = math.ceil(batches / accumulate)
        total = max_steps if max_steps > 0 else per_epoch * max(epochs, 1)
        lines.append(f"  steps: {per_epoch} per epoch, {total} in total "
                     f"({'max_steps' if max_steps > 0 else f'{max(epochs, 1)} epoch(s)'})")
        if cfg.method.get("retain_iterator") == "once" and total > per_epoch:  # rmu.py on_train_epoch_end
            lines.append(f"  updates: {per_epoch}, epoch 1 only (method.retain_iterator=once); the learning-rate "
                         f"schedule is sized for the {total}")
    else:
        lines.append(f"  steps: unknown without the data (max_steps={max_steps}, max_epochs={epochs})")
    by_part: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        by_part[part_of(name)][0 if param.requires_grad else 1] += param.numel()
    total_params = sum(t + f for t, f in by_part.values())
    trainable = sum(t for t, _ in by_part.values())
    lines.append(f"  parameters: {total_params / 1e6:,.1f}M, trainable {trainable / 1e6:,.2f}M "
                 f"({100 * trainable / max(total_params, 1):.2f}%)")
    for part, (t, f) in sorted(by_part.items()):
        lines.append(f"    {part:<16} trainable {t / 1e6:>10,.2f}M   frozen {f / 1e6:>10,.2f}M")
    frozen = [part for part, (t, f) in sorted(by_part.items()) if f and not t]
    lines.append(f"  frozen entirely: {', '.join(frozen) or 'nothing'}")
    tensors = trained_tensors(model)
    lines += [f"  trains: {t}" for t in tensors[:8]]
    if len(tensors) > 8:
        lines.append(f"  trains: ... {len(tensors) - 8} more tensor groups")
    reference, reference_params = reference_of(cfg, model)
    lines.append(f"  reference: {reference}")
    kind, offload_opt, offload_par, strategy_text = plan_strategy(cfg.trainer, world)
    lines.append(f"  strategy: {strategy_text} on {world} process(es)" + _devices_note(cfg.trainer, world))
    at, recommended = recipe_strategy(cfg, world)
    if recommended:
        lines.append(f"  recipe's strategy for {world} GPU(s) (strategy_by_gpus[{at}]): {recommended}")
    path = run_update_path(cfg)
    lines.append(f"  update path: {path.text}")
    weight_bytes = WEIGHT_BYTES.get(str(cfg.model.dtype), 2)
    precision = str(cfg.trainer.get("precision") or "32-true")
    act_bytes = 2 if weight_bytes == 2 or precision in AUTOCAST_PRECISIONS + CAST_PRECISIONS else 4
    _, blocks = decoder_layers(model)
    shape = ModelShape(total_params=total_params, trainable_params=trainable, n_layers=len(blocks),
                       hidden=text_cfg.hidden_size, vocab=text_cfg.vocab_size,
                       block_params=sum(p.numel() for p in blocks[0].parameters()) if len(blocks) else 0,
                       kv_heads=getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads,
                       head_dim=getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads)
    eval_tokens = int(cfg.data.max_length) + int(cfg.eval.max_new_tokens)
    estimate = estimate_memory(
        shape, weight_bytes=weight_bytes, path=path.name, strategy=kind, world=world,
        seq_len=int(cfg.data.max_length), batch=batch, checkpointing=bool(cfg.model.gradient_checkpointing),
        graphs=1 if method == "sft" else 2, reference_params=reference_params, fused=path.name != "kahan",
        offload_optimizer=offload_opt, offload_params=offload_par, act_bytes=act_bytes,
        eval_batch=int(cfg.data.eval_batch_size), eval_tokens=eval_tokens)
    lines.append(f"  GPU memory estimate per device (batch {batch} x data.max_length={cfg.data.max_length} tokens, "
                 f"checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, {strategy_text} on "
                 f"{world}; validation generates {cfg.data.eval_batch_size} x {eval_tokens} tokens; an upper bound "
                 "for shorter batches; the total counts the larger of training activations and the KV cache):")
    lines += [f"    {name:<26} {size(value)}" for name, value in estimate.rows()]
    lines.append(f"    device: {device_memory_line(estimate.total)}")
    return "\n".join(lines)


def _devices_note(trainer_cfg, world: int) -> str:
    devices = trainer_cfg.get("devices", "auto")
    if str(devices) in ("-1", "auto") and str(trainer_cfg.get("accelerator", "auto")) != "cpu":
        seen = torch.cuda.device_count()
        return (f" (trainer.devices={devices}: {seen} visible GPU(s))" if seen else
                f" (trainer.devices={devices}: no GPU visible here, planned for 1; plan for N with trainer.devices=N)")
    return ""


def size(n_bytes: float) -> str:
    return f"{n_bytes / GiB:8.2f} GiB" if n_bytes >= GiB / 10 else f"{n_bytes / 2 ** 20:8.2f} MiB"


def device_memory_line(need: float) -> str:
    if not torch.cuda.is_available():
        return "no CUDA device visible here: compare the total with your GPU's memory"
    props = torch.cuda.get_device_properties(0)
    verdict = "fits" if need < 0.9 * props.total_memory else "does NOT fit (keep 10% headroom)"
    return f"{props.name}, {props.total_memory / GiB:.1f} GiB: {verdict}"


def print_plan(cfg, strict: bool = True) -> None:
    """Print the plan (rank 0 only: DDP ranks re-run the command). Not `strict` (fit's first lines):
    a plan that cannot be made is one line, and the run goes on to load the model itself."""
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) != 0:
        return
    try:
        print(run_plan(cfg), flush=True)
    except UserError as err:
        if strict:
            raise
        print(f"run plan: not available ({err})", flush=True)
