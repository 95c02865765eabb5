"""Models side by side on one suite (`evaluate.models`): each model -- base, SFT, NPO, RMU checkpoints
or hub ids -- runs the suite in `run_dir/models/<name>/` (resumable per task, so a finished model is
only read back), then `run_dir/results.csv` (columns model, task, ...), `results.md` (one table per
task, a row per model, with intervals) and `tradeoff.png` (safety vs utility per model: the clean
and the attacked ASR against mean utility; the paper's trade-off picture)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from core.files import atomic_write, save_figure
from lightning_modules.analysis.evaluation import evaluation_dir, read_settings
from lightning_modules.analysis.suite import HEADLINE, check_tasks, family, run_suite, suite_markdown


def model_config(cfg, model):
    """cfg with one entry of evaluate.models as its model."""
    sub = OmegaConf.merge(cfg, {"model": {"name_or_path": model.name_or_path, "adapter_path": model.adapter_path}})
    if model.adapter_path:
        sub.model.finetune = "lora"
    sub.evaluate.checkpoint = model.checkpoint
    sub.evaluate.models = []
    return sub


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
    tables = []
    for i, model in enumerate(settings.models, 1):
        print(f"== model {i}/{len(settings.models)}: {model.name} ({model.name_or_path})")
        mine = dataclasses.replace(settings, checkpoint=model.checkpoint, models=[])
        table = run_suite(model_config(cfg, model), mine, run_dir / "models" / model.name, judge)
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


def tradeoff_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean headline utility over utility tasks, mean clean ASR and mean attacked
    (any-of-K) ASR over safety tasks."""
    head = table[table["headline"].astype(bool)]
    rows = []
    for model, part in head.groupby("model", sort=False):
        util = part[part["role"] == "utility"]
        utility = [r[HEADLINE[family(r["kind"])]] for _, r in util.iterrows()]
        unsafe = part[part["subset"] == "unsafes"]
        rows.append(dict(model=model, utility=pd.Series(utility, dtype=float).mean(),
                         clean_asr=unsafe[unsafe["role"] == "clean"]["asr"].astype(float).mean(),
                         attacked_asr=unsafe[unsafe["role"] == "attacked"]["asr"].astype(float).mean(),
                         n_utility=len(utility), n_safety=int((unsafe["role"] == "clean").sum())))
    return pd.DataFrame(rows)


def plot_tradeoff(table: pd.DataFrame, path: Path):
    """Safety (ASR, lower is safer) against utility per model; None (no figure) without both kinds of task."""
    points = tradeoff_points(table)
    if points.empty or points["utility"].isna().all() or points["clean_asr"].isna().all():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for i, p in points.iterrows():
        color = f"C{i % 10}"
        ax.scatter(100 * p["utility"], 100 * p["clean_asr"], color=color, label=f"{p['model']} (clean)")
        ax.annotate(str(p["model"]), (100 * p["utility"], 100 * p["clean_asr"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8, color=color)
        if pd.notna(p["attacked_asr"]):
            ax.scatter(100 * p["utility"], 100 * p["attacked_asr"], facecolors="none", edgecolors=color,
                       label=f"{p['model']} (one-word attack)")
            ax.annotate("", (100 * p["utility"], 100 * p["attacked_asr"]), (100 * p["utility"], 100 * p["clean_asr"]),
                        arrowprops=dict(arrowstyle="->", color=color))
    ax.set(xlim=(-5, 105), ylim=(-5, 105))
    ax.set_xlabel("utility: mean of the utility tasks' headline score (%)")
    ax.set_ylabel("ASR on unsafe queries (%, lower is safer)")
    ax.legend(fontsize=7)
    n_u, n_s = int(points["n_utility"].max()), int(points["n_safety"].max())
    fig.text(0.5, 0.01, f"means over {n_u} utility and {n_s} safety task(s); arrow: clean -> attacked",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, what="trade-off figure", dpi=110)
    plt.close(fig)
    return path
