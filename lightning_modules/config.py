"""Config schema and loading: OmegaConf YAML with a `defaults:` list, dotlist overrides, validation.

A run config is composed like lightning-hydra-template's, without Hydra:

    defaults: [model/tiny, data/mirage_world, method/sft, trainer/cpu]   # configs/<group>/<name>.yaml
    name: demo
    optim: {lr: 1e-3}

Each `group/name` entry is merged under the key `group` when the group is one of the config
groups below, at the top level otherwise (an experiment may start from another experiment).
The file's own keys are merged next, then command-line `key=value` overrides; `group=name`
(e.g. `method=npo`) swaps a whole group. The result is checked against the dataclass schema,
so a mistyped key or a wrongly typed value fails in one line before anything runs.
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import UserError
from core.schema import check_value, config_error, field_docs, parse_section, reject_unknown, setting
from models.tiny import TinyConfig

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "data", "method", "trainer", "base", "eval", "optim", "logger")


def _refusal_presets():
    from metrics.refusal import refusal_presets

    return refusal_presets()


def _judges():
    from metrics.judges import JUDGES

    return [*JUDGES, "vlm"]  # vlm: the batched VLM judge of eval.vlm_judge (metrics/vlm_judge.py)


# Every key of a run config, its type, default, allowed values and one line of doc: adding a key is
# one line here. Checked by `core.schema` when the config is loaded, before any model or data.
@dataclass
class LoraSettings:
    r: int = setting(8, "LoRA rank", ge=1)
    alpha: int = setting(16, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = setting(0.0, "dropout on the LoRA input", ge=0, lt=1)
    # A regex on the language model only: a plain ["q_proj", "v_proj"] also adapts CLIP.
    target_modules: str = setting(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                  "regex of the module names that get adapters", regex=True)
    modules_to_save: list[str] = setting(doc="modules trained in full next to the adapters", factory=list)


@dataclass
class ModelSettings:
    name_or_path: str = setting("tiny", "'tiny' (the Mirage World's LLaVA) or a toy family (tiny-llava, "
                                "tiny-llava-next, tiny-qwen2-vl, tiny-qwen2.5-vl), built from model.tiny with random "
                                "weights; else a Hugging Face id or a local path")
    revision: Optional[str] = setting(None, "git revision of a Hugging Face model")
    dtype: str = setting("float32", "weight dtype", choices=("float32", "bfloat16", "float16", "auto"))
    trust_remote_code: bool = setting(False, "run a model repository's own code (off unless you trust it)")
    attn_implementation: Optional[str] = setting(None, "transformers attention backend (e.g. sdpa, eager)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    finetune: str = setting("full", "what trains", choices=("full", "lora", "projector"))
    freeze_vision: bool = setting(True, "keep the vision tower frozen (LLaVA does)")
    adapter_path: Optional[str] = setting(None, "a saved LoRA adapter to start from")
    lora: LoraSettings = setting(doc="LoRA settings", factory=LoraSettings)
    tiny: TinyConfig = setting(doc="size of the tiny model", factory=TinyConfig)
    end_token: Optional[str] = setting(None, "the token closing an assistant turn: labelled once after every "
                                       "response and a stop token of generation (default: the tokenizer's EOS)")
    rmu_layer: Optional[int] = setting(None, "RMU's layer for this model when method.layer=auto "
                                       "(default: round(7/32 x decoder layers))", ge=0)


@dataclass
class BaseSettings:
    """Pre-training of the tiny base on the world's base corpus (cached by its config)."""

    vision_steps: int = setting(1500, "steps of the vision-tower probe stage", ge=0)
    vision_lr: float = setting(3e-3, "learning rate of the vision stage", gt=0)
    steps: int = setting(1200, "steps of the language stage", ge=0)
    lr: float = setting(2e-3, "learning rate of the language stage", gt=0)
    batch_size: int = setting(32, "batch size of the language stage", ge=1)
    seed: int = setting(0, "the base's own seed: method seeds vary without retraining the base", ge=0)
    cache_dir: str = setting("${paths.cache}/bases", "where built bases are cached")


@dataclass
class ForgetRetainSettings:
    """Training data of the unlearning methods (datamodules/forget_retain.py): forget = unsafe
    queries with a harmful response, retain = safe queries with their answers."""

    forget_source: str = setting("data", "data: the rows' harmful_response / forget_file; harvest: the base "
                                 "model's own answers", choices=("data", "harvest"))
    forget_file: Optional[str] = setting(None, "VLGuard-format file whose unsafe rows' responses are forgotten")
    retain_file: Optional[str] = setting(None, "VLGuard-format file whose safe rows are kept (default: data.train_file)")
    retain_general_ratio: float = setting(0.0, "share of general instruction rows topping up the retain set",
                                          ge=0, lt=1)
    cue_balance: str = setting("none", "match: forget rows' first words redrawn from the retain distribution",
                               choices=("none", "match"))
    max_forget: Optional[int] = setting(None, "at most this many forget rows", ge=1)
    harvest_max_new_tokens: int = setting(64, "tokens generated per harvested answer", ge=1)
    harvest_dir: str = setting("${paths.cache}/harvest", "where harvested forget sets are cached")


@dataclass
class DataSettings:
    kind: str = setting("mirage_world", "where the data comes from", choices=("mirage_world", "vlguard"))
    root: Optional[str] = setting(None, "kind=vlguard: a directory written by `python -m datamodules.vlguard "
                                  "prepare` (train/val/test, images, retain file; keys set explicitly win)")
    world: dict[str, Any] = setting(doc="Mirage World knobs (datamodules.mirage_world.WorldConfig)", factory=dict)
    world_root: str = setting("${paths.cache}/worlds", "where generated worlds are cached")
    train_file: Optional[str] = setting(None, "VLGuard-format JSON (kind=vlguard)")
    val_file: Optional[str] = setting(None, "validation file (kind=vlguard)")
    test_file: Optional[str] = setting(None, "test file (kind=vlguard)")
    image_dir: Optional[str] = setting(None, "images are resolved relative to this (default: the file's folder)")
    image_mode: str = setting("real", "real | blank (same-size blank image) | none (text only)",
                              choices=("real", "blank", "none"))
    general_file: Optional[str] = setting(None, "general instruction data mixed into SFT (post-hoc recipe)")
    general_ratio: float = setting(0.0, "share of general rows in the SFT mixture", ge=0, lt=1)
    compliance_cue: str = setting("What", "eval rewrite of unsafe queries for VLGuard data")
    refusal_cue: str = setting("Share", "eval rewrite of safe queries for VLGuard data")
    neutral_cue: Optional[str] = setting(None, "VLGuard data: the control cue of the neutral eval sets (none if unset)")
    batch_size: int = setting(16, "training batch size per device", ge=1)
    eval_batch_size: int = setting(64, "generation batch size per device", ge=1)
    max_length: int = setting(160, "longest tokenized example; longer ones are an error", ge=1)
    max_eval_samples: Optional[int] = setting(None, "queries per eval set, stratified by subset, category and "
                                              "image source (null: all)", ge=1)
    attack_shots: int = setting(1, "K rewrites per unsafe query in unsafe_attacked (attacked if any succeeds)", ge=1)
    num_workers: int = setting(0, "DataLoader worker processes", ge=0)
    cache_encodings: bool = setting(False, "encode each example once and keep its tensors (small images only: "
                                           "it keeps every distinct image's pixels in memory)")
    forget_retain: ForgetRetainSettings = setting(doc="unlearning data", factory=ForgetRetainSettings)


@dataclass
class OptimSettings:
    lr: float = setting(1e-3, "peak learning rate of AdamW (0: weights stay as they are)", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.999], ge=0, lt=1, length=2)
    warmup_ratio: float = setting(0.03, "share of the steps spent warming up", ge=0, le=1)
    scheduler: str = setting("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))


@dataclass
class VLMJudgeSettings:
    """The VLM judge of harmful compliance in validation / test (eval.judge=vlm; metrics/vlm_judge.py)."""

    model: ModelSettings = setting(doc="the judge model", factory=lambda: ModelSettings(
        name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", dtype="bfloat16"))
    protocol: str = setting("official_3shot", "judge prompt protocol", choices=("official_clean", "official_3shot"))
    prefilter: bool = setting(True, "the protocol's rule-based 'irrelevant' words, before asking the model")
    batch_size: int = setting(8, "judge batch size", ge=1)
    max_new_tokens: int = setting(200, "tokens the judge may write", ge=1)
    max_length: int = setting(4096, "longest judge prompt", ge=1)
    cache: Optional[str] = setting(None, "verdict cache, JSON lines (null: <run_dir>/judge_cache.jsonl)")


@dataclass
class EvalSettings:
    max_new_tokens: int = setting(24, "tokens generated per answer", ge=1)
    refusal_preset: str = setting("vlguard", "refusal keyword list", choices=_refusal_presets)
    judge: str = setting("reference", "reference: the record's harmful_keywords | keyword: every non-refusal | "
                         "vlm: eval.vlm_judge (without harmful_keywords, as on real VLGuard, only vlm measures IR)",
                         choices=_judges)
    vlm_judge: VLMJudgeSettings = setting(doc="the VLM judge (eval.judge=vlm)", factory=VLMJudgeSettings)
    log_samples: int = setting(3, "sample answers logged to TensorBoard per eval set", ge=0)
    val_at_start: bool = setting(True, "a step-0 point on every curve")
    test_at_end: bool = setting(True, "test after training and write results")
    test_split: str = setting("test", "val reports on the validation split (for choosing hyperparameters)",
                              choices=("test", "val"))
    probes: bool = setting(False, "knowledge probes after the test evaluation (lightning_modules.probes -> probes.json)")


@dataclass
class CheckpointSettings:
    every_n_train_steps: Optional[int] = setting(None, "checkpoint interval in steps (null: end of epoch)", ge=1)
    save_last: bool = setting(True, "keep checkpoints/last.ckpt")
    save_top_k: int = setting(0, "best checkpoints kept (-1: all)", ge=-1)


@dataclass
class ExportSettings:
    """What `fit` writes to <run_dir>/model: the weights (a LoRA adapter, or the full model), the
    processor, and a model card (README.md) with the method, data, hyperparameters and test metrics."""

    merge_lora: bool = setting(False, "LoRA: model/ holds the merged full model, the adapter goes to adapter/")
    model_card: bool = setting(True, "write model/README.md with the method, data, hyperparameters and test metrics")


@dataclass
class PathSettings:
    cache: str = setting(".cache/safety-mirage", "root of the shared caches (worlds, bases, harvests)")


@dataclass
class RunConfig:
    name: str = setting("run", "run name")
    seed: int = setting(0, "seed of the run", ge=0)
    run_dir: str = setting("runs/${name}", "where the run writes")
    resume: Optional[str] = setting(None, "last, a checkpoint path, or auto (last.ckpt if there is one)")
    resume_allow_changes: bool = setting(False, "let a resume change data, model, base or method settings")
    threads: Optional[int] = setting(None, "torch intra-op threads per process (null: torch's default)", ge=1)
    paths: PathSettings = setting(doc="shared paths", factory=PathSettings)
    model: ModelSettings = setting(doc="the model", factory=ModelSettings)
    base: BaseSettings = setting(doc="the tiny base", factory=BaseSettings)
    data: DataSettings = setting(doc="the data", factory=DataSettings)
    method: dict[str, Any] = setting(doc="method.name and its hyperparameters", factory=lambda: {"name": "sft"})
    optim: OptimSettings = setting(doc="the optimizer", factory=OptimSettings)
    eval: EvalSettings = setting(doc="evaluation", factory=EvalSettings)
    checkpoint: CheckpointSettings = setting(doc="checkpoints", factory=CheckpointSettings)
    export: ExportSettings = setting(doc="what fit writes to <run_dir>/model", factory=ExportSettings)
    trainer: dict[str, Any] = setting(doc="keyword arguments of lightning.Trainer", factory=dict)
    logger: dict[str, Any] = setting(doc="experiment loggers, `<kind>: {kwargs}` with kind tensorboard | csv | wandb "
                                     "(configs/logger/*.yaml; empty: TensorBoard; trainer.logger=false: none)",
                                     factory=dict)
    evaluate: dict[str, Any] = setting(doc="the evaluate command (lightning_modules.evaluate.EvaluateSettings)",
                                       factory=dict)
    compare: dict[str, Any] = setting(doc="the compare command (lightning_modules.compare.CompareSettings)",
                                      factory=dict)
    probes: dict[str, Any] = setting(doc="the knowledge probes (eval.probes=true; lightning_modules.probes.ProbeSettings)",
                                     factory=dict)


# Ranges of the lightning.Trainer arguments a config sets most; their types come from Trainer's own
# signature, so any argument of it is type-checked.
TRAINER_RANGES = {
    "max_steps": {"ge": -1}, "min_steps": {"ge": 0}, "max_epochs": {"ge": -1}, "min_epochs": {"ge": 0},
    "num_nodes": {"ge": 1}, "accumulate_grad_batches": {"ge": 1}, "log_every_n_steps": {"ge": 1},
    "check_val_every_n_epoch": {"ge": 1}, "num_sanity_val_steps": {"ge": -1}, "gradient_clip_val": {"ge": 0},
    "val_check_interval": {"gt": 0}, "limit_train_batches": {"ge": 0}, "limit_val_batches": {"ge": 0},
    "limit_test_batches": {"ge": 0}, "limit_predict_batches": {"ge": 0}, "overfit_batches": {"ge": 0},
    "reload_dataloaders_every_n_epochs": {"ge": 0}, "gradient_clip_algorithm": {"choices": ("norm", "value")},
}
# Checked by lightning_modules.strategies (a name or a mapping), or objects YAML cannot express.
TRAINER_UNTYPED = {"strategy", "logger", "callbacks", "plugins", "profiler", "accelerator"}
# Sections whose settings class lives with the command that uses them (imported when set).
COMMAND_SECTIONS = {"evaluate": ("lightning_modules.evaluate", "EvaluateSettings"),
                    "compare": ("lightning_modules.compare", "CompareSettings"),
                    "probes": ("lightning_modules.probes", "ProbeSettings")}


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise UserError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: expected a mapping at the top level")
    return cfg


def _group_file(group: str, name: str) -> Path:
    path = CONFIG_ROOT / group / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))
        raise UserError(f"unknown {group} config '{name}'; choose one of: {', '.join(options)}")
    return path


def _compose(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path in seen:
        raise UserError(f"{path}: circular defaults")
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", [])
    if not isinstance(defaults, (list, ListConfig)):
        raise UserError(f"{path}: 'defaults' must be a list of 'group/name' entries")
    merged = OmegaConf.create({})
    for entry in defaults:
        group, _, name = str(entry).partition("/")
        if group in GROUPS and name:
            merged = OmegaConf.merge(merged, {group: _compose(_group_file(group, name), seen + (path,))})
        else:
            merged = OmegaConf.merge(merged, _compose(CONFIG_ROOT / f"{entry}.yaml", seen + (path,)))
    return OmegaConf.merge(merged, raw)


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    dotlist = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"override '{item}' is not of the form key=value")
        if key in GROUPS and "." not in key and value and not value.startswith("{"):
            # `method=npo` replaces the whole group with configs/method/npo.yaml.
            cfg[key] = _compose(_group_file(key, value))
        else:
            dotlist.append(item)
    for item in dotlist:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except Exception as err:  # yaml.YAMLError, OmegaConf's errors, a list merged onto a mapping
            raise UserError(f"invalid override '{item}': {str(err).splitlines()[0]}") from err
    return cfg


def _validate(cfg: DictConfig) -> DictConfig:
    """Types, unknown keys, ranges and choices of every section, before anything is loaded."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    except OmegaConfBaseException as err:
        raise config_error(err) from err
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        raise UserError(f"cannot resolve config: {str(err).splitlines()[0]}") from err
    parse_section(merged, RunConfig, "")  # declared ranges and choices of the typed sections
    _check_trainer(merged.trainer)
    _check_method(merged.method)
    if merged.data.kind == "mirage_world":
        from datamodules.mirage_world import WorldConfig

        try:
            parse_section(merged.data.world, WorldConfig, "data.world")
        except ValueError as err:  # WorldConfig's own cross-field checks
            raise UserError(f"invalid value for config key data.world.{err}") from err
    for section, (module, name) in COMMAND_SECTIONS.items():
        if merged[section]:
            parse_section(merged[section], getattr(importlib.import_module(module), name), section)
    return merged


def _check_trainer(trainer: DictConfig) -> None:
    hints = typing.get_type_hints(L.Trainer.__init__)
    reject_unknown("trainer", trainer.keys(), set(inspect.signature(L.Trainer.__init__).parameters) - {"self"},
                   "not an argument of lightning.Trainer")
    for key, value in OmegaConf.to_container(trainer).items():
        if key not in TRAINER_UNTYPED:
            check_value(f"trainer.{key}", value, TRAINER_RANGES.get(key, {}), hints.get(key))


def _check_method(method: DictConfig) -> None:
    if "name" not in method:
        raise UserError("config key 'method.name' is missing")
    from lightning_modules.base import get_method

    get_method(method.name).parse_params(method)


def settings_help() -> str:
    """Every config key with its default, allowed values and doc (the epilog of --help)."""
    rows = field_docs(RunConfig)
    width = max(len(key) for key, *_ in rows)
    lines = ["config keys (key=value overrides; method.*, trainer.*, evaluate.*, compare.* are checked by "
             "their method, lightning.Trainer and the command):"]
    lines += [f"  {key:<{width}}  {doc} [{allowed}; default {default}]" for key, default, allowed, doc in rows]
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Compose `path`, apply `key=value` overrides, validate against the schema, resolve."""
    cfg = _compose(Path(path).resolve())
    cfg = _apply_overrides(cfg, overrides or [])
    return _validate(cfg)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def config_cli(argv: list[str], prog: str, description: str, example: str, run: Callable) -> None:
    """The command line every entry point shares: --config FILE [key=value ...] [--print-config] [--debug]."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=settings_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML config (e.g. {example})")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return
    run(cfg)
