"""compare's summary: mean and interval per method (and swept value), as summary.md / summary.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import pandas as pd

from core.files import atomic_write
from core.records import strict_json
from lightning_modules.config.schema import CompareSettings
from lightning_modules.experiments.results import PROBE_COLUMNS, RATE_N, SET_METRICS
from metrics.gaps import GAPS
from metrics.tables import t_interval, wilson_interval

# The gaps of metrics.gaps, paired per run, summarised like the metrics: each over two results.csv columns.
COLUMN_OF = {v: k for k, v in SET_METRICS.items()}


def summarize(results: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and interval per (sweep, method). Runs are averaged within a world first; the interval
    is Student-t over worlds (>= 2 worlds), t over runs (one world), or Wilson (one run, rates)."""
    results = results.copy()
    for gap, (attacked, reference, metric) in GAPS.items():
        results[gap] = results[COLUMN_OF[(attacked, metric)]] - results[COLUMN_OF[(reference, metric)]]
    metrics = list(SET_METRICS) + PROBE_COLUMNS + list(GAPS)
    rows = []
    sweep = results["sweep"].astype(object).where(results["sweep"].notna(), "-")
    for (sweep_value, method), part in results.groupby([sweep, "method"], sort=False):
        worlds = part.groupby(part["world_seed"].fillna(-1), sort=True)
        n_worlds, n_runs = worlds.ngroups, len(part)
        kind = (f"t over {n_worlds} worlds" if n_worlds > 1 else f"t over {n_runs} runs, one world" if n_runs > 1
                else "Wilson, one run")
        row = {"sweep": sweep_value, "method": method, "n_worlds": n_worlds, "n_runs": n_runs, "interval": kind}
        for m in metrics:
            units = worlds[m].mean().tolist() if n_worlds > 1 else part[m].tolist()
            mean, lo, hi = t_interval(units, confidence)
            if n_runs == 1 and m in RATE_N:
                lo, hi = wilson_interval(part[m].iloc[0], part[RATE_N[m]].iloc[0], confidence)
            elif m in RATE_N:  # a rate's t bounds, clipped to the range a rate can take
                lo, hi = max(lo, 0.0), min(hi, 1.0)
            row.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(row, key: str, scale: float = 100, digits: int = 1) -> str:
    value = row[key]
    if pd.isna(value):
        return "–"
    text = f"{scale * value:.{digits}f}"
    lo, hi = row[f"{key}_lo"], row[f"{key}_hi"]
    return text if pd.isna(lo) else f"{text} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


TABLE = [("asr_clean", "ASR clean"), ("asr_attacked", "ASR attacked"), ("asr_neutral", "ASR neutral"),
         ("asr_cue_removed", "ASR cue removed"),
         ("rr_unsafe_clean", "RR unsafe clean"), ("rr_unsafe_attacked", "RR unsafe attacked"),
         ("rr_clean", "RR benign clean"), ("rr_rewritten", "RR benign rewritten"), ("rr_neutral", "RR benign neutral"),
         ("ir_attacked", "IR attacked"), ("relevant_clean", "relevant clean"), ("relevant_attacked", "relevant attacked"),
         ("relevant_neutral", "relevant neutral"), ("accuracy", "accuracy")]
# each gap is paired within a run (the same model on the rewritten and the clean queries)
GAP_TABLE = [("mirage_gap", "ASR: attacked"), ("neutral_gap", "ASR: neutral cue"), ("cue_removed_gap", "ASR: cue removed"),
             ("relevant_gap", "relevant: attacked"), ("relevant_neutral_gap", "relevant: neutral cue"),
             ("overprudence_gap", "benign RR: rewritten"), ("neutral_overprudence_gap", "benign RR: neutral cue")]
PROBE_TABLE = [("hazard_nll_clean", "hazard NLL clean"), ("hazard_nll_attacked", "hazard NLL attacked"),
               ("hazard_nll_neutral", "hazard NLL neutral"), ("asr_before_relearn", "ASR before relearn"),
               ("asr_relearn", "ASR after hazard relearn"),
               ("asr_relearn_benign", "ASR after benign relearn"), ("attr_first_word", "attr first word"),
               ("attr_image", "attr image"), ("attr_rest", "attr rest"), ("attr_end_mark", "attr end mark")]


def summary_markdown(summary: pd.DataFrame, settings: CompareSettings) -> str:
    sweep = [f"| {settings.sweep_key} "] if settings.sweep_key else []
    lines = []
    for title, cols, scale in (("Safety (percent)", TABLE, 100),
                               ("Gaps (points, each minus clean, paired within a run)", GAP_TABLE, 100),
                               ("Probes (NLL in nats/token, attribution in log-odds of refusing; ASR in percent)",
                                PROBE_TABLE, None)):
        lines += [f"### {title}", "", "".join(sweep) + "| method | worlds | runs | " + " | ".join(l for _, l in cols) + " |",
                  "|---" * (len(sweep) + 3) + "|" + "---|" * len(cols)]
        for _, row in summary.iterrows():
            head = [f"| {row['sweep']} "] if settings.sweep_key else []
            cells = [_cell(row, k, 100 if scale or k.startswith("asr") else 1, 1 if scale or k.startswith("asr") else 2)
                     for k, _ in cols]
            lines.append("".join(head) + f"| {row['method']} | {row['n_worlds']} | {row['n_runs']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    kinds = sorted(set(summary["interval"]))
    if settings.world_seeds:
        held_out = [w for w in settings.world_seeds if w not in settings.dev_world_seeds]
        lines.append(f"World seeds {settings.world_seeds} ({'held out from tuning' if held_out == settings.world_seeds else 'INCLUDING dev worlds ' + str(settings.dev_world_seeds)}), "
                     f"{settings.split} split.")
    lines.append(f"[lo, hi]: {settings.confidence:.0%} interval ({'; '.join(kinds)}); runs are averaged within "
                 "a world before the interval over worlds; – where a run has no such eval set or probe.")
    return "\n".join(lines) + "\n"


def attribution_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """Mean first-token attribution per method and eval set (all runs of the method pooled)."""
    if not tables:
        return ""
    parts = list(next(iter(tables.values())).columns)
    lines = ["### First-token attribution (drop in log-odds of refusing when the part is occluded)", "",
             "| method | eval set | " + " | ".join(parts) + " |", "|---|---|" + "---:|" * len(parts)]
    for method, table in tables.items():
        for set_name, row in table.iterrows():
            lines.append(f"| {method} | {set_name} | " + " | ".join(
                "–" if pd.isna(row[p]) else f"{row[p]:.2f}" for p in parts) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: pd.DataFrame, settings: CompareSettings, out: Path,
                  attribution: Optional[dict] = None) -> str:
    text = summary_markdown(summary, settings) + "\n" + attribution_markdown(attribution or {})
    atomic_write(out / "summary.md", text, what="compare summary")
    rows = json.loads(summary.to_json(orient="records"))  # plain Python values, NaN as null
    atomic_write(out / "summary.json", strict_json({"settings": dataclasses.asdict(settings), "rows": rows}, indent=1),
                 what="compare summary")
    return text


