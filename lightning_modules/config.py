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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import UserError
from models.tiny import TinyConfig

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "data", "method", "trainer", "base", "eval", "optim")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # A regex on the language model only: a plain ["q_proj", "v_proj"] also adapts CLIP (DESIGN §7).
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class ModelSettings:
    name_or_path: str = "tiny"  # "tiny" = built from `tiny`; else a Hugging Face id or local path
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    finetune: str = "full"  # full | lora | projector
    freeze_vision: bool = True  # LLaVA keeps CLIP frozen
    adapter_path: Optional[str] = None  # a saved LoRA adapter to start from
    lora: LoraSettings = field(default_factory=LoraSettings)
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class BaseSettings:
    """Pre-training of the tiny base on the world's base corpus (cached by its config)."""

    vision_steps: int = 1500
    vision_lr: float = 3e-3
    steps: int = 1200
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0  # the base's own seed: method seeds vary without retraining the base
    cache_dir: str = "${paths.cache}/bases"


@dataclass
class ForgetRetainSettings:
    """Training data of the unlearning methods (datamodules/forget_retain.py): forget = unsafe
    queries with a harmful response, retain = safe queries with their answers."""

    forget_source: str = "data"  # data: the rows' harmful_response / forget_file | harvest: the base model's answers
    forget_file: Optional[str] = None  # VLGuard-format file whose unsafe rows' responses are forgotten
    retain_file: Optional[str] = None  # VLGuard-format file whose safe rows are kept (default: data.train_file)
    retain_general_ratio: float = 0.0  # share of general instruction rows topping up the retain set
    cue_balance: str = "none"  # none | match: forget rows' first words redrawn from the retain distribution
    max_forget: Optional[int] = None
    harvest_max_new_tokens: int = 64
    harvest_dir: str = "${paths.cache}/harvest"


@dataclass
class DataSettings:
    kind: str = "mirage_world"  # mirage_world | vlguard
    world: dict[str, Any] = field(default_factory=dict)  # WorldConfig knobs
    world_root: str = "${paths.cache}/worlds"
    train_file: Optional[str] = None  # VLGuard-format JSON (kind=vlguard)
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    image_dir: Optional[str] = None  # images are resolved relative to this (default: the file's dir)
    image_mode: str = "real"  # real | blank (same-size blank image: text-only files, reliance control)
    general_file: Optional[str] = None  # general instruction data mixed into SFT (post-hoc recipe)
    general_ratio: float = 0.0  # share of general rows in the SFT mixture
    compliance_cue: str = "What"  # eval rewrites for VLGuard data (the world carries its own cues)
    refusal_cue: str = "Share"
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 160
    max_eval_samples: Optional[int] = None  # per eval set
    num_workers: int = 0
    forget_retain: ForgetRetainSettings = field(default_factory=ForgetRetainSettings)


@dataclass
class OptimSettings:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"  # cosine | constant


@dataclass
class EvalSettings:
    max_new_tokens: int = 24
    refusal_preset: str = "vlguard"
    judge: str = "reference"  # reference: harmful_keywords of the record (exact world judge) | keyword
    log_samples: int = 3
    val_at_start: bool = True  # a step-0 point on every curve
    test_at_end: bool = True
    test_split: str = "test"  # test | val: "val" reports on the validation split (for choosing hyperparameters)
    probes: bool = False  # knowledge probes after the test evaluation (lightning_modules.probes -> probes.json)


@dataclass
class CheckpointSettings:
    every_n_train_steps: Optional[int] = None
    save_last: bool = True
    save_top_k: int = 0


@dataclass
class PathSettings:
    cache: str = ".cache/safety-mirage"


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    run_dir: str = "runs/${name}"
    resume: Optional[str] = None  # "last", a checkpoint path, or "auto" (last.ckpt if there is one)
    threads: Optional[int] = None  # torch intra-op threads per process (None: torch's default)
    paths: PathSettings = field(default_factory=PathSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    base: BaseSettings = field(default_factory=BaseSettings)
    data: DataSettings = field(default_factory=DataSettings)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "sft"})
    optim: OptimSettings = field(default_factory=OptimSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    trainer: dict[str, Any] = field(default_factory=dict)  # keyword arguments of lightning.Trainer
    # The evaluate command's settings, validated by lightning_modules.evaluate.EvaluateSettings.
    evaluate: dict[str, Any] = field(default_factory=dict)
    # The compare command's settings, validated by lightning_modules.compare.CompareSettings.
    compare: dict[str, Any] = field(default_factory=dict)
    # The knowledge probes' settings (eval.probes=true), validated by lightning_modules.probes.ProbeSettings.
    probes: dict[str, Any] = field(default_factory=dict)


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
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as err:
        raise UserError(f"invalid override: {str(err).splitlines()[0]}") from err


def _validate(cfg: DictConfig) -> DictConfig:
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        if "not in" in msg or "Key" in msg and "not" in msg:
            raise UserError(f"unknown config key '{key}'") from err
        raise UserError(f"invalid value for config key '{key}': {msg}") from err
    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in merged.trainer:
        if key not in trainer_args:
            raise UserError(f"unknown config key 'trainer.{key}' (not an argument of lightning.Trainer)")
    if "name" not in merged.method:
        raise UserError("config key 'method.name' is missing")
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        raise UserError(f"cannot resolve config: {str(err).splitlines()[0]}") from err
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Compose `path`, apply `key=value` overrides, validate against the schema, resolve."""
    cfg = _compose(Path(path).resolve())
    cfg = _apply_overrides(cfg, overrides or [])
    return _validate(cfg)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def config_cli(argv: list[str], prog: str, description: str, example: str, run: Callable) -> None:
    """The command line every entry point shares: --config FILE [key=value ...] [--print-config] [--debug]."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
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
