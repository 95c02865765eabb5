"""Models side by side on one suite (`evaluate.models`): each model -- base, SFT, NPO, RMU checkpoints
or hub ids -- runs the suite in `run_dir/models/<name>/` (resumable per task, so a finished model is
only read back), then `run_dir/results.csv` (columns model, task, ...), `results.md` (one table per
task, a row per model, with intervals) and `tradeoff.png` (suite_tables).

An entry is `name_or_path` (+ `adapter_path`, `checkpoint`), or a `path` told by what it holds: a
LoRA adapter directory, a fit checkpoint .ckpt, a save_pretrained directory, a fit run directory
(its exported model/), or a finished suite's folder, whose results.csv is read (nothing generated)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from core.errors import UserError
from core.files import atomic_write
from lightning_modules.analysis.evaluation import evaluation_dir, read_settings
from lightning_modules.analysis.suite import check_tasks, run_suite
from lightning_modules.analysis.suite_tables import plot_tradeoff, suite_markdown


def _suite_results(path: Path) -> bool:
    """A finished suite's results.csv (a task column), not a fit run's test results."""
    try:
        return "task" in pd.read_csv(path / "results.csv", nrows=0).columns
    except (OSError, ValueError):
        return (path / "results.csv").is_file()  # unreadable: read_results says why in one line


def fit_run_model(model):
    """A fit run directory as an entry's path stands for the model it exported (`<run_dir>/model/`)."""
    path = Path(model.path) if model.path else None
    exported = path / "model" if path else None
    if exported and not _suite_results(path) and any((exported / f).is_file() for f in ("config.json", "adapter_config.json")):
        return dataclasses.replace(model, path=str(exported))
    return model


def entry_kind(model) -> str:
    """What an evaluate.models entry is: name_or_path (a hub id, a directory, tiny) or, by what its
    path holds, adapter (adapter_config.json), checkpoint (.ckpt), model (config.json) or results
    (results.csv of a finished suite)."""
    where = f"evaluate.models '{model.name}'"
    if model.path is None:
        if not model.name_or_path:
            raise UserError(f"{where}: give name_or_path (a hub id or a model directory) or path")
        return "name_or_path"
    if model.adapter_path or model.checkpoint:
        raise UserError(f"{where}: path {model.path} replaces adapter_path and checkpoint: give one of them")
    path = Path(model.path)
    if path.is_file() and path.suffix == ".ckpt":
        kind = "checkpoint"
    elif (path / "adapter_config.json").is_file():
        kind = "adapter"
    elif (path / "config.json").is_file():
        kind = "model"
    elif _suite_results(path):
        kind = "results"
    else:
        raise UserError(f"{where}: path {path} {'is not' if path.exists() else 'not found: expected'} a LoRA adapter "
                        "directory (adapter_config.json), a fit checkpoint .ckpt, a save_pretrained directory "
                        "(config.json) or a finished suite's folder (results.csv)")
    if model.name_or_path and kind in ("model", "results"):
        raise UserError(f"{where}: name_or_path is the base of an adapter or checkpoint path, not of {kind} {path}")
    return kind


def adapter_base(model) -> str:
    config = Path(model.path) / "adapter_config.json"
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"evaluate.models '{model.name}': {config} is not an adapter config: {err}") from err
    if not base:
        raise UserError(f"evaluate.models '{model.name}': {config} names no base_model_name_or_path: "
                        "give the base as the entry's name_or_path")
    return base


def model_config(cfg, model, kind: str):
    """cfg with one entry of evaluate.models (not a results folder) as its model."""
    name_or_path, adapter, checkpoint = model.name_or_path, model.adapter_path, model.checkpoint
    if kind == "adapter":
        name_or_path, adapter = name_or_path or adapter_base(model), model.path
    elif kind == "checkpoint":
        name_or_path, checkpoint = name_or_path or cfg.model.name_or_path, model.path
    elif kind == "model":
        name_or_path = model.path
    sub = OmegaConf.merge(cfg, {"model": {"name_or_path": name_or_path, "adapter_path": adapter}})
    if adapter:
        sub.model.finetune = "lora"
    sub.evaluate.checkpoint = checkpoint
    sub.evaluate.models = []
    return sub


def read_results(model, settings) -> pd.DataFrame:
    """The rows of the suite's tasks in a finished suite's results.csv (one model's)."""
    path, where = Path(model.path) / "results.csv", f"evaluate.models '{model.name}'"
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: cannot read {path}: {str(err).strip().splitlines()[0]}") from err
    if "task" not in table or "model" in table:
        raise UserError(f"{where}: {path} is not one model's suite results (a task column, no model column)")
    names = [t.name for t in settings.tasks]
    missing = [n for n in names if n not in set(table["task"])]
    if missing:
        raise UserError(f"{where}: {path} has no rows for task '{missing[0]}': run the suite there first")
    return table[table["task"].isin(names)].reset_index(drop=True)


def evaluate_suite(cfg, judge=None) -> pd.DataFrame:
    """`evaluate.tasks`: the suite on model.* alone, or on every evaluate.models entry and then side
    by side."""
    settings = read_settings(cfg)
    check_tasks(settings)
    with evaluation_dir(cfg) as run_dir:
        return run_models(cfg, settings, run_dir, judge)


def run_models(cfg, settings, run_dir: Path, judge=None) -> pd.DataFrame:
    """The suite on model.* alone, or on every evaluate.models entry and then side by side."""
    if not settings.models:
        table = run_suite(cfg, settings, run_dir, judge)
        if plot_tradeoff(table.assign(model=cfg.model.name_or_path), run_dir / "tradeoff.png"):
            print(f"written: {run_dir}/tradeoff.png")
        return table
    settings = dataclasses.replace(settings, models=[fit_run_model(m) for m in settings.models])
    kinds = [entry_kind(model) for model in settings.models]  # every entry checked before the first runs
    configs = [None if kind == "results" else model_config(cfg, model, kind)
               for model, kind in zip(settings.models, kinds)]
    tables = []
    for i, (model, sub) in enumerate(zip(settings.models, configs), 1):
        if sub is None:
            print(f"== model {i}/{len(settings.models)}: {model.name}: the suite already run in {model.path} (read)")
            tables.append(read_results(model, settings).assign(model=model.name))
            continue
        print(f"== model {i}/{len(settings.models)}: {model.name} ({sub.model.name_or_path}"
              f"{f' + adapter {sub.model.adapter_path}' if sub.model.adapter_path else ''}"
              f"{f' + checkpoint {sub.evaluate.checkpoint}' if sub.evaluate.checkpoint else ''})")
        mine = dataclasses.replace(settings, checkpoint=sub.evaluate.checkpoint, models=[])
        table = run_suite(sub, mine, run_dir / "models" / model.name, judge)
        tables.append(table.assign(model=model.name))
    table = pd.concat(tables, ignore_index=True)
    table = table[["model", *[c for c in table.columns if c != "model"]]]
    report = suite_markdown(table, [m.name for m in settings.models])
    atomic_write(run_dir / "results.csv", table.to_csv(index=False), what="results")
    atomic_write(run_dir / "results.md", report, what="results")
    figure = plot_tradeoff(table, run_dir / "tradeoff.png")
    print(report)
    print(f"written: {run_dir}/results.csv, results.md" + (f", {figure.name}" if figure else ""))
    return table
