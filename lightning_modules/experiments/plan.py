"""The plan of a comparison: which runs (method x world x base x seed x swept value), each run's
fit config, its directory, and the hash that tells a finished row from a stale one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from core.errors import UserError
from core.paths import CONFIG_ROOT
from core.schema import parse_section
from lightning_modules.config.diff import flatten
from lightning_modules.config.loading import load_config
from lightning_modules.config.schema import CompareSettings
from lightning_modules.experiments.slurm_settings import slurm_minutes
from lightning_modules.methods import METHODS

# The row of the model before any alignment (evaluated on sft's experiment with no training step).
UNALIGNED = "unaligned"
STACK_KEYS = {"seed": "seeds", "base.seed": "base_seeds", "data.world.seed": "world_seeds"}
RUN_KEYS = ("run_dir", "name", "resume")  # set per run by compare itself



@dataclasses.dataclass(frozen=True)
class RunKey:
    sweep: Any
    method: str
    world_seed: Optional[int]
    base_seed: Optional[int]
    seed: Optional[int]  # None for base: it has no alignment run

    def label(self) -> str:
        parts = [f"method={self.method}"] + [f"{k}={v}" for k, v in (("sweep", self.sweep), ("world_seed", self.world_seed),
                                                                   ("base_seed", self.base_seed), ("seed", self.seed))
                                            if v is not None]
        return ", ".join(parts)


def parse_settings(cfg) -> CompareSettings:
    settings = parse_section(cfg.compare, CompareSettings, "compare")  # types, unknown keys, ranges, choices
    if "{method}" not in settings.experiment:
        raise UserError(f"compare.experiment '{settings.experiment}' must contain '{{method}}' (e.g. mirage_{{method}})")
    for key in ("methods", "seeds", "world_seeds", "base_seeds"):
        if getattr(settings, key) == []:
            raise UserError(f"compare.{key} is empty")
    if settings.sweep_key in STACK_KEYS or settings.sweep_key in RUN_KEYS:
        raise UserError(f"compare.sweep_key={settings.sweep_key} cannot be swept"
                        + (f"; list its values in compare.{STACK_KEYS[settings.sweep_key]}"
                           if settings.sweep_key in STACK_KEYS else " (compare sets it per run)"))
    if settings.sweep_key and not settings.sweep_values:
        raise UserError(f"compare.sweep_key={settings.sweep_key} needs compare.sweep_values")
    slurm_minutes(settings.slurm)  # whatever the launcher: a config is checked whole
    if settings.sweep_values and not settings.sweep_key:
        raise UserError("compare.sweep_values needs compare.sweep_key (the dotted key they set)")
    return settings


def apply_command_line(settings: CompareSettings, overrides: list[str]) -> list[str]:
    """The command line's top-level overrides that reach every run. A seed-stack key given there
    (`seed`, `base.seed`, `data.world.seed`) replaces its compare list by that one value."""
    passed = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "compare" or key.startswith("compare.") or key in RUN_KEYS:
            continue
        if key == settings.sweep_key:
            raise UserError(f"{key} is swept by compare.sweep_key; set compare.sweep_values instead")
        if key in STACK_KEYS:
            try:
                setattr(settings, STACK_KEYS[key], [int(value)])
            except ValueError as err:
                raise UserError(f"{key}={value!r} on the command line must be an integer") from err
            print(f"compare: {key}={value} from the command line: compare.{STACK_KEYS[key]}=[{int(value)}]")
            continue
        passed.append(item)
    return passed


def experiment_file(settings: CompareSettings, method: str) -> tuple[Path, list[str]]:
    """The experiment file of `method` and the overrides that make it that method's: its own file
    (`compare.experiment` with the method's name) when there is one, else the family file (the
    pattern without `_{method}`, e.g. mirage.yaml) with `method=<name>` -- so a method added to the
    registry runs in compare with no experiment file of its own."""
    method = "sft" if method == UNALIGNED else method
    own = CONFIG_ROOT / "experiment" / f"{settings.experiment.format(method=method)}.yaml"
    if own.is_file():
        return own, []
    family = CONFIG_ROOT / "experiment" / f"{settings.experiment.replace('_{method}', '').replace('{method}', '')}.yaml"
    if method in METHODS and family.is_file():
        return family, [f"method={method}"]
    raise UserError(f"unknown method '{method}' in compare.methods for compare.experiment={settings.experiment} "
                    f"(no {own.relative_to(CONFIG_ROOT.parent)}, and no family file "
                    f"{family.relative_to(CONFIG_ROOT.parent)} for a registered method; methods: {', '.join(METHODS)})")


def plan(settings: CompareSettings, common: list[str]) -> list[RunKey]:
    """Every run of the comparison, base once per (sweep value, world, base seed)."""
    path, as_method = experiment_file(settings, settings.methods[0])
    probe = load_config(path, as_method + list(settings.overrides) + common)
    is_world = probe.data.kind == "mirage_world"
    if settings.world_seeds is not None and not is_world:
        raise UserError(f"compare.world_seeds is set but the experiment's data.kind is '{probe.data.kind}' "
                        "(only the Mirage World has world seeds)")
    worlds = settings.world_seeds or ([int(probe.data.world.get("seed", 0))] if is_world else [None])
    bases = settings.base_seeds or ([int(probe.base.seed)] if probe.model.name_or_path == "tiny" else [None])
    keys = []
    for sweep in settings.sweep_values or [None]:
        for method in settings.methods:
            for world in worlds:
                for base in bases:
                    for seed in ([None] if method == UNALIGNED else settings.seeds):
                        keys.append(RunKey(sweep, method, world, base, seed))
    return keys


def run_path(out: Path, key: RunKey, sweep_key: Optional[str]) -> Path:
    path = out / f"{sweep_key.rsplit('.', 1)[-1]}{key.sweep}" if sweep_key else out
    name = "-".join(f"{k}{v}" for k, v in (("world", key.world_seed), ("base", key.base_seed), ("seed", key.seed))
                    if v is not None)
    return path / key.method / (name or "run")


def run_config(settings: CompareSettings, key: RunKey, common: list[str], run_dir: Path):
    """The fit config of one run: the method's experiment file, then compare.overrides, its world's
    compare.world_overrides, `common` (the command line's overrides, which win) and its own keys."""
    world = list(settings.world_overrides.get(key.world_seed, [])) if key.world_seed is not None else []
    own = [f"name={key.method}", f"run_dir={run_dir}", "resume=null", f"eval.test_split={settings.split}"]
    if key.seed is not None:
        own.append(f"seed={key.seed}")
    if key.world_seed is not None:
        own.append(f"data.world.seed={key.world_seed}")
    if key.base_seed is not None:
        own.append(f"base.seed={key.base_seed}")
    if settings.sweep_key:
        own.append(f"{settings.sweep_key}={json.dumps(key.sweep) if isinstance(key.sweep, str) else key.sweep}")
    if key.method == UNALIGNED:  # the model before alignment: evaluation only
        own += ["trainer.max_steps=0", "eval.val_at_start=false"]
    path, as_method = experiment_file(settings, key.method)
    cfg = load_config(path, as_method + list(settings.overrides) + world + common + own)
    if settings.sweep_key and OmegaConf.select(cfg, settings.sweep_key, default="<missing>") == "<missing>":
        raise UserError(f"compare.sweep_key '{settings.sweep_key}' is not a key of the run config")
    return cfg


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(flatten(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
