"""A suite's tables: which metric heads each task (HEADLINE), one markdown table per task with a
row per model (`results.md`), and the trade-off figure (safety vs utility per model, `tradeoff.png`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from core.files import save_figure
from datamodules.benchmarks import TASK_KINDS

FRONT = ["task", "kind", "role", "headline", "set", "subset", "shot", "category", "n"]
# the number each utility task is summarised by: MMBench's accuracy is CircularEval's, POPE's the
# mean F1 of its three categories (LLaVA-1.5's); EXTRA: the columns shown beside it when present
HEADLINE = {"vqa": "vqa_accuracy", "multiple_choice": "accuracy", "pope": "f1_mean", "mme": "accuracy"}
EXTRA = ("accuracy_single", "f1", "perception_score", "cognition_score")


def family(kind: str) -> str:
    return "safety" if kind == "vlguard" else TASK_KINDS[kind].family


def _cell(row: pd.Series, metric: str) -> str:
    value = row.get(metric, math.nan)
    if value is None or pd.isna(value):
        return "–"
    lo, hi = row.get(f"{metric}_lo", math.nan), row.get(f"{metric}_hi", math.nan)
    scale = 1 if metric.endswith("score") else 100  # MME's scores are not rates
    text = f"{scale * value:.2f}"
    return text if pd.isna(lo) else f"{text} [{scale * lo:.1f}, {scale * hi:.1f}]"


def _columns_of(part: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(header, set, subset, metric) per headline row of a task."""
    cols = []
    for _, row in part.drop_duplicates(["set", "subset"]).iterrows():
        where = (row["set"], row["subset"])
        if row["role"] == "utility":
            metrics = [HEADLINE[family(row["kind"])]] + [m for m in EXTRA
                                                         if m in part and pd.notna(row.get(m, math.nan))]
            if family(row["kind"]) == "pope":  # pooled accuracy beside the mean and pooled F1
                metrics.append("accuracy")
            cols += [(m, *where, m) for m in metrics]
        elif row["role"] == "gap":
            cols.append((f"{row['set']} ({row['gap_of'].split(':')[0]})", *where, "gap"))
        else:
            metric = "refusal_rate" if row["subset"] == "safe_safes" else "asr"
            cols.append((f"{row['set']}/{row['subset']} {'RR' if metric == 'refusal_rate' else 'ASR'}", *where, metric))
    return cols


def suite_markdown(table: pd.DataFrame, models: list[str]) -> str:
    """One table per task: a row per model, the task's headline numbers in percent with intervals
    (gaps in points; MME's scores as they are)."""
    table = table if "model" in table else table.assign(model=models[0])
    out = []
    for task in dict.fromkeys(table["task"]):
        part = table[(table["task"] == task) & table["headline"].astype(bool)]
        cols = _columns_of(part)
        lines = []
        for model in dict.fromkeys(part["model"]):
            mine = part[part["model"] == model]
            cells = []
            for _, set_name, subset, metric in cols:
                hit = mine[(mine["set"] == set_name) & (mine["subset"] == subset)]
                cells.append(_cell(hit.iloc[0], metric) if len(hit) else "–")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        heads = [c[0] for c in cols]
        out += [f"### {task} ({part['kind'].iloc[0]})", "",
                "| model | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|", *lines, ""]
    return "\n".join(out)


def tradeoff_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean headline utility over utility tasks, mean clean ASR and mean attacked
    (any-of-K) ASR over safety tasks."""
    head = table[table["headline"].astype(bool)].reindex(columns=[*dict.fromkeys([*table.columns, "asr"])])
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
