"""Config loading: OmegaConf YAML with a `defaults:` list, dotlist overrides, validation.

A run config is composed like lightning-hydra-template's, without Hydra:

    defaults: [model/tiny, data/mirage_world, method/sft, trainer/cpu]   # configs/<group>/<name>.yaml
    name: demo
    optim: {lr: 1e-3}

Each `group/name` entry is merged under the key `group` when the group is one of the config
groups (`config.schema.GROUPS`), at the top level otherwise (an experiment may start from
another experiment). The file's own keys are merged next, then command-line `key=value`
overrides; `group=name` (e.g. `method=npo`) swaps a whole group. The result is checked against
the schema (`config.schema`), so a mistyped key or a wrongly typed value fails in one line
before anything runs.
"""

from __future__ import annotations

import argparse
import inspect
import re
import typing
from pathlib import Path
from typing import Callable

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import UserError
from core.faults import planted_fault
from core.paths import CONFIG_ROOT
from core.schema import check_value, config_error, field_docs, parse_section, reject_unknown
from lightning_modules.config.schema import COMMAND_SECTIONS, GROUPS, ROOTS, FitConfig
from lightning_modules.methods import get_method
from models.precision import run_update_path

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


def root_of(cfg: DictConfig) -> type:
    """The root schema a composed config asks for: a command section (`evaluate:`, `compare:`) names
    its command's root, anything else is a fit config."""
    found = [key for key in ROOTS if key in cfg]
    if len(found) > 1:
        raise UserError(f"a config is for one command, this one has {' and '.join(f'`{k}:`' for k in found)} sections")
    return ROOTS[found[0]] if found else FitConfig


def _validate(cfg: DictConfig, root: type, allow_missing: bool = False) -> DictConfig:
    """Types, unknown keys, ranges and choices of every section, before anything is loaded. With
    `allow_missing` (--print-config) a config that still has mandatory `???` values stops after the type
    and key checks and comes back with every value that can be resolved resolved, the rest as written."""
    for section, command_root in ROOTS.items():
        if section in cfg and not issubclass(root, command_root):
            raise UserError(f"this config has an `{section}:` section, which belongs to the {section} command: "
                            f"python -m lightning_modules.{section} --config FILE")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(root), cfg)
    except OmegaConfBaseException as err:
        raise config_error(err) from err
    if allow_missing and OmegaConf.missing_keys(merged):
        _resolve_available(merged)
        return merged
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        raw = OmegaConf.to_container(merged, resolve=False)
        cycle = interpolation_cycle(raw, getattr(err, "full_key", None))
        if cycle:
            values = ", ".join(f"{key}={_raw(raw, key)!r}" for key in cycle[:-1])
            raise UserError(f"cannot resolve config: the interpolations {' -> '.join(cycle)} form a cycle "
                            f"({values}); set one of these keys to a plain value") from err
        raise UserError(f"cannot resolve config: {str(err).splitlines()[0]}") from err
    parse_section(merged, root, "")  # declared ranges and choices of the typed sections
    _check_trainer(merged.trainer)
    _check_method(merged.method)
    if root is FitConfig:  # a run that trains: its update path is decided now (models/precision.py)
        run_update_path(merged)
    if merged.data.kind == "mirage_world":
        from datamodules.mirage_world import WorldConfig

        try:
            parse_section(merged.data.world, WorldConfig, "data.world")
        except ValueError as err:  # WorldConfig's own cross-field checks
            raise UserError(f"invalid value for config key data.world.{err}") from err
    for section, settings_class in COMMAND_SECTIONS.items():
        if merged.get(section):
            parse_section(merged[section], settings_class, section)
    return merged


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # `${a.b}` (not resolvers, not relative keys)


def _raw(tree, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def interpolation_cycle(tree: dict, start) -> list[str]:
    """The keys of a cycle of `${...}` references reached from `start` (e.g. name -> run_dir ->
    name), or [] when there is none."""
    if not start:
        return []
    path: list[str] = []

    def visit(key: str) -> list[str]:
        if key in path:
            return path[path.index(key):] + [key]
        value = _raw(tree, key)
        if not isinstance(value, str):
            return []
        path.append(key)
        for ref in _REFERENCE.findall(value):
            found = visit(ref)
            if found:
                return found
        path.pop()
        return []

    return visit(str(start))


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
    get_method(method.name).parse_params(method)


def settings_help(root: type = FitConfig) -> str:
    """Every config key of a command with its default, allowed values and doc (the epilog of --help)."""
    rows = field_docs(root)
    width = max(len(key) for key, *_ in rows)
    lines = ["config keys (key=value overrides; method.*, trainer.*, evaluate.*, compare.* are checked by "
             "their method, lightning.Trainer and the command):"]
    lines += [f"  {key:<{width}}  {doc} [{allowed}; default {default}]" for key, default, allowed, doc in rows]
    return "\n".join(lines)


def _resolve_available(node) -> None:
    """Resolve in place every interpolation that resolves; one that needs a `???` value stays as written."""
    for key in (list(node.keys()) if isinstance(node, DictConfig) else range(len(node))):
        child = node._get_node(key)
        if child._is_interpolation():
            try:
                node[key] = node[key]
            except OmegaConfBaseException:
                pass
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
            _resolve_available(child)


def load_config(path: str | Path, overrides: list[str] | None = None, root: type | None = None,
                allow_missing: bool = False) -> DictConfig:
    """Compose `path`, apply `key=value` overrides, validate against the root schema of a command
    (`root`; by default the one the config's sections ask for, `root_of`), resolve. `allow_missing`:
    mandatory `???` values may remain (for printing; `_validate`)."""
    cfg = _compose(Path(path).resolve())
    cfg = _apply_overrides(cfg, overrides or [])
    return _validate(cfg, root or root_of(cfg), allow_missing)


def to_yaml(cfg: DictConfig) -> str:
    missing = sorted(OmegaConf.missing_keys(cfg))
    note = f"# mandatory values still to set (???): {', '.join(missing)}\n" if missing else ""
    return note + OmegaConf.to_yaml(cfg)


def config_cli(argv: list[str], prog: str, description: str, example: str, run: Callable,
               root: type = FitConfig, plan: Callable | None = None) -> None:
    """The command line every entry point shares: --config FILE [key=value ...] [--print-config] [--debug];
    the config is checked against the command's root schema `root`. With `plan`, `--plan` prints
    the run plan and exits."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=settings_help(root),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML config (e.g. {example})")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    if plan is not None:
        parser.add_argument("--plan", action="store_true", help="print the run plan (data sizes, steps, trainable "
                            "parameters, reference, GPU memory estimate) without loading weights, and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    if args.print_config:  # a config with `???` values left prints with them shown
        print(to_yaml(load_config(args.config, args.overrides, root, allow_missing=True)))
        return
    cfg = load_config(args.config, args.overrides, root)
    planted_fault()  # a malformed SAFETY_MIRAGE_FAULT stops every command here, before anything is written
    if getattr(args, "plan", False):
        plan(cfg)
        return
    run(cfg)
