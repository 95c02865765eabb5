"""The figures of `compare` (matplotlib, written into its output directory):

* `methods.png`: per method, refusal of unsafe queries clean -> attacked, ASR (relevance judge and
  exact hazard content) clean -> attacked -> neutral cue, benign refusal clean -> rewritten ->
  neutral cue, benign accuracy;
* `probes.png`: hazard-answer NLL under each cue, and ASR before / after the relearning attacks;
* `attribution.png`: per method, a heat map of the first-token attribution (eval set x query part);
* `sweep.png` (with a numeric `compare.sweep_key`): the mirage gaps (relevance judge, exact hazard)
  and the over-prudence gap against the swept value, methods offset side by side.

Every caption states n (runs and worlds) and the interval kind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from core.files import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def _save(plt, fig, path: Path, title: Optional[str], caption: Optional[str] = None) -> Path:
    """Title, caption under the axes, PNG, figure closed."""
    if title:
        fig.suptitle(title)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", fontsize=8)
        fig.tight_layout(rect=(0, 0.05, 1, 0.95 if title else 1))
    try:
        save_figure(fig, path, what="figure", dpi=110)  # a full disk: one line, earlier figures whole
    finally:
        plt.close(fig)
    return path

def _caption(summary: pd.DataFrame, confidence: float, gaps: bool = False) -> str:
    runs = sorted(set(summary["n_runs"]))
    worlds = sorted(set(summary["n_worlds"]))
    kinds = "; ".join(sorted({"none for a gap of one run" if gaps and k.startswith("Wilson") else k
                              for k in summary["interval"]}))
    return (f"n = {'/'.join(map(str, runs))} run(s) per method over {'/'.join(map(str, worlds))} world(s); "
            f"bars/points: mean; whiskers: {confidence:.0%} interval ({kinds})")


def _bars(ax, summary: pd.DataFrame, cols: list[tuple[str, str]], title: str, scale: float = 100) -> None:
    x = np.arange(len(summary))
    width = 0.8 / len(cols)
    for i, (col, label) in enumerate(cols):
        mean = scale * summary[col].to_numpy(float)
        lo, hi = scale * summary[f"{col}_lo"].to_numpy(float), scale * summary[f"{col}_hi"].to_numpy(float)
        err = np.nan_to_num(np.vstack([mean - lo, hi - mean]), nan=0.0).clip(min=0)
        missing = np.isnan(mean).all()  # an eval set the runs lack: no bar, never a bar at 0
        ax.bar(x + (i - (len(cols) - 1) / 2) * width, mean, width, yerr=err, capsize=2,
               label=f"{label} (not measured)" if missing else label)
    ax.set_xticks(x, summary["method"], rotation=20)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def plot_methods(summary: pd.DataFrame, confidence: float, path: Path, title: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    _bars(axes[0], summary, [("rr_unsafe_clean", "clean"), ("rr_unsafe_attacked", "attacked")],
          "refusal of unsafe queries (%)")
    _bars(axes[1], summary, [("relevant_clean", "clean"), ("relevant_attacked", "compliance cue"),
                             ("relevant_neutral", "neutral cue")], "ASR, relevance judge (%)")
    _bars(axes[2], summary, [("asr_clean", "clean"), ("asr_attacked", "compliance cue"),
                             ("asr_neutral", "neutral cue")], "ASR, exact hazard content (%)")
    _bars(axes[3], summary, [("rr_clean", "clean"), ("rr_rewritten", "refusal cue"), ("rr_neutral", "neutral cue")],
          "refusal of benign queries (%)")
    _bars(axes[4], summary, [("accuracy", "clean"), ("accuracy_rewritten", "refusal cue")], "benign accuracy (%)")
    for ax in axes:
        ax.set_ylim(0, 105)
    return _save(plt, fig, path, title, _caption(summary, confidence))


def plot_probes(summary: pd.DataFrame, confidence: float, path: Path, title: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _bars(axes[0], summary, [("hazard_nll_clean", "clean"), ("hazard_nll_attacked", "compliance cue"),
                             ("hazard_nll_neutral", "neutral cue")],
          "NLL of the hazard answer (nats/token, log scale; higher = less known)", scale=1)
    axes[0].set_yscale("log")  # the base's 0.2 and GA's 50 on one axis
    _bars(axes[1], summary, [("asr_before_relearn", "before"), ("asr_relearn", "after hazard relearning"),
                             ("asr_relearn_benign", "after benign relearning")], "ASR on clean unsafe queries (%)")
    axes[1].set_ylim(0, 105)
    return _save(plt, fig, path, title, _caption(summary, confidence))


def attribution_by_method(results: pd.DataFrame, out: Path) -> dict[str, pd.DataFrame]:
    """method -> (eval set x query part) mean attribution over its runs' probes.json."""
    tables: dict[str, list[pd.DataFrame]] = {}
    for method, run_dir in zip(results["method"], results["run_dir"]):
        file = out / str(run_dir) / "probes.json"
        if not file.is_file():
            continue
        attribution = json.loads(file.read_text(encoding="utf-8")).get("attribution") or {}
        attribution = {k: v for k, v in attribution.items() if isinstance(v, dict)}  # sets only
        if attribution:
            frame = pd.DataFrame({s: {k: v.get("mean") for k, v in parts.items()} for s, parts in attribution.items()}).T
            tables.setdefault(method, []).append(frame.astype(float))
    return {m: sum(frames) / len(frames) for m, frames in tables.items()}


def plot_attribution(tables: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    plt = _plt()
    tables = {m: t.drop(columns=["log_odds"], errors="ignore") for m, t in tables.items()}  # parts only
    limit = max(float(np.nanmax(np.abs(t.to_numpy()))) for t in tables.values()) or 1.0
    ncols = min(4, len(tables))
    nrows = math.ceil(len(tables) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols + 2.4, 2.9 * nrows + 0.6), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[len(tables):]:
        ax.axis("off")
    for k, (ax, (method, table)) in enumerate(zip(axes.flat, tables.items())):
        image = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, fontsize=8)
        ax.set_yticks(range(table.shape[0]), table.index if k % ncols == 0 else [], fontsize=8)
        for (i, j), v in np.ndenumerate(table.to_numpy()):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(method)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="log-odds(refuse) lost when occluded")
    return _save(plt, fig, path, title)


def plot_sweep(summary: pd.DataFrame, sweep_key: str, confidence: float, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    values = sorted(float(v) for v in summary["sweep"].unique())
    step = min(np.diff(values)) if len(values) > 1 else 1.0
    methods = list(dict.fromkeys(summary["method"]))
    for ax, (gap, label) in zip(axes, [("relevant_gap", "mirage gap, relevance judge: attacked - clean (points)"),
                                       ("mirage_gap", "mirage gap, exact hazard: attacked - clean (points)"),
                                       ("overprudence_gap", "over-prudence gap: benign RR rewritten - clean (points)")]):
        for i, method in enumerate(methods):
            part = summary[summary["method"] == method].assign(x=lambda d: d["sweep"].astype(float)).sort_values("x")
            offset = (i - (len(methods) - 1) / 2) * 0.12 * step / max(len(methods), 1)
            mean = 100 * part[gap].to_numpy(float)
            err = np.nan_to_num(np.vstack([mean - 100 * part[f"{gap}_lo"].to_numpy(float),
                                           100 * part[f"{gap}_hi"].to_numpy(float) - mean]), nan=0.0).clip(min=0)
            ax.errorbar(part["x"] + offset, mean, yerr=err, marker="o", capsize=3, label=method)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(sweep_key)
        ax.set_ylabel(label, fontsize=9)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, None,
                 _caption(summary, confidence, gaps=True) + "; methods offset horizontally for legibility")


def _numeric(values) -> bool:
    try:
        [float(v) for v in values]
        return True
    except (TypeError, ValueError):
        return False


def plot_all(results: pd.DataFrame, summary: pd.DataFrame, settings, out: Path) -> list[Path]:
    written = []
    sweeps = list(dict.fromkeys(summary["sweep"]))
    for sweep in sweeps:
        part = summary[summary["sweep"] == sweep]
        suffix = "" if len(sweeps) == 1 else f"_{settings.sweep_key.rsplit('.', 1)[-1]}{sweep}"
        title = f"{out.name} ({settings.experiment})" + ("" if sweep == "-" else f", {settings.sweep_key}={sweep}")
        written.append(plot_methods(part, settings.confidence, out / f"methods{suffix}.png", title))
        if part[["hazard_nll_clean", "asr_relearn"]].notna().any().any():
            written.append(plot_probes(part, settings.confidence, out / f"probes{suffix}.png", title))
        runs = results[results["sweep"].fillna("-").astype(str) == str(sweep)] if len(sweeps) > 1 else results
        tables = attribution_by_method(runs, out)
        if tables:
            written.append(plot_attribution(tables, out / f"attribution{suffix}.png", title + ": first-token attribution"))
    if settings.sweep_key and len(sweeps) > 1 and _numeric(sweeps):
        written.append(plot_sweep(summary, settings.sweep_key, settings.confidence, out / "sweep.png"))
    return written
