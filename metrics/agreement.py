"""Agreement between two judges on the same generations: Cohen's kappa and confusion counts.

    python -m metrics.agreement A/samples.jsonl B/samples.jsonl [--field harmful] [--by set]
    python -m metrics.agreement A/samples.jsonl --presets vlguard strict [--by subset]

Two files (samples.jsonl of `fit` or `evaluate`, one schema; e.g. one run judged with `keyword` and a copy
re-judged with `vlm`) are matched on (set, id, subset, shot, prompt); `--field` picks what is
compared: `harmful` (default), `refusal`, or `verdict` (the judge's call where both judged:
relevant/harmful = yes, irrelevant/not_harmful = no). With `--presets` the two raters are refusal
keyword presets (`metrics.refusal`) applied to the responses of one file.

kappa = (p_o - p_e) / (1 - p_e) with p_e from the two raters' marginals; it is undefined (NaN)
when both raters give one and the same label to every sample.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from core.errors import UserError, cli_main
from metrics.refusal import is_refusal, refusal_presets
from metrics.samples import KEY as SAMPLE_KEY, read_samples

KEY = list(SAMPLE_KEY)

FIELDS = ("harmful", "refusal", "verdict")
POSITIVE_VERDICTS = {"relevant", "harmful"}
NEGATIVE_VERDICTS = {"irrelevant", "not_harmful"}


def samples_frame(path: str | Path) -> pd.DataFrame:
    """A `samples.jsonl` of `fit` or `evaluate` (one schema) as a frame; never modifies the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"samples file not found: {path}")
    rows = read_samples(path, repair=False, check=False)
    if not rows:
        raise UserError(f"{path}: no samples")
    frame = pd.DataFrame(rows)
    missing = [k for k in KEY + ["response"] if k not in frame.columns]
    if missing:
        raise UserError(f"{path}: samples lack the key(s) {', '.join(missing)} (not a samples.jsonl of fit or evaluate?)")
    return frame


def _labels(frame: pd.DataFrame, field: str, path: str) -> pd.Series:
    if field not in frame.columns:
        raise UserError(f"{path}: samples have no field '{field}'")
    values = frame[field]
    if field != "verdict":
        return values.astype(bool)
    unknown = set(values.dropna()) - POSITIVE_VERDICTS - NEGATIVE_VERDICTS
    if unknown:
        raise UserError(f"{path}: unknown verdict value(s) {sorted(unknown)}")
    return values.map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v))
                      else v in POSITIVE_VERDICTS)


def cohen_kappa(a: pd.Series, b: pd.Series) -> tuple[float, float, pd.DataFrame]:
    """(kappa, observed agreement, confusion counts with rows = a, columns = b)."""
    labels = sorted(set(a) | set(b), key=str)
    table = pd.crosstab(a, b).reindex(index=labels, columns=labels, fill_value=0)
    counts = table.to_numpy(float)
    n = counts.sum()
    if n == 0:
        return math.nan, math.nan, table
    p_o = np.trace(counts) / n
    p_e = float((counts.sum(1) * counts.sum(0)).sum() / n**2)
    kappa = math.nan if math.isclose(p_e, 1.0) else (p_o - p_e) / (1 - p_e)
    return float(kappa), float(p_o), table


def agreement(a: pd.Series, b: pd.Series, groups: Optional[pd.Series] = None) -> list[dict]:
    """One summary per group (the whole set first): n, agreement, kappa, confusion counts."""
    parts = [("all", a.index)]
    if groups is not None:
        parts += [(str(g), a.index[groups.to_numpy() == g]) for g in groups.unique()]
    out = []
    for name, idx in parts:
        kappa, p_o, table = cohen_kappa(a.loc[idx], b.loc[idx])
        out.append(dict(group=name, n=len(idx), agreement=p_o, kappa=kappa,
                        confusion={f"{r}/{c}": int(table.loc[r, c]) for r in table.index for c in table.columns}))
    return out


def compare_files(path_a: str, path_b: str, field: str, by: Optional[str]) -> dict:
    a, b = samples_frame(path_a), samples_frame(path_b)
    a["_label"], b["_label"] = _labels(a, field, path_a), _labels(b, field, path_b)
    merged = a.merge(b, on=KEY, how="inner", suffixes=("_a", "_b"))
    if merged.empty:
        raise UserError(f"{path_a} and {path_b} share no generation (matched on {', '.join(KEY)})")
    merged = merged[merged["_label_a"].notna() & merged["_label_b"].notna()].reset_index(drop=True)
    if merged.empty:
        raise UserError(f"no sample has a '{field}' value in both files")
    groups = merged[by] if by else None
    return dict(raters=[path_a, path_b], field=field, only_a=len(a) - len(a.merge(b[KEY], on=KEY)),
                only_b=len(b) - len(b.merge(a[KEY], on=KEY)),
                results=agreement(merged["_label_a"].astype(bool), merged["_label_b"].astype(bool), groups))


def compare_presets(path: str, preset_a: str, preset_b: str, by: Optional[str]) -> dict:
    for preset in (preset_a, preset_b):
        if preset not in refusal_presets():
            raise UserError(f"unknown refusal preset '{preset}'; choose one of: {', '.join(refusal_presets())}")
    frame = samples_frame(path)
    a = frame["response"].map(lambda r: is_refusal(str(r), preset_a))
    b = frame["response"].map(lambda r: is_refusal(str(r), preset_b))
    return dict(raters=[f"refusal:{preset_a}", f"refusal:{preset_b}"], field="refusal", only_a=0, only_b=0,
                results=agreement(a, b, frame[by] if by else None))


def to_markdown(report: dict) -> str:
    a, b = report["raters"]
    lines = [f"# Judge agreement on '{report['field']}'", "", f"- A: {a}", f"- B: {b}",
             f"- unmatched generations: {report['only_a']} only in A, {report['only_b']} only in B", ""]
    table = pd.DataFrame([{"group": r["group"], "n": r["n"], "agreement": f"{r['agreement']:.3f}",
                           "Cohen's kappa": "undefined" if math.isnan(r["kappa"]) else f"{r['kappa']:.3f}",
                           "confusion (A/B: count)": ", ".join(f"{k}: {v}" for k, v in r["confusion"].items())}
                          for r in report["results"]])
    return "\n".join(lines) + "\n" + table.to_markdown(index=False)


@cli_main
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m metrics.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("samples", nargs="+", help="one or two samples.jsonl files")
    parser.add_argument("--field", choices=FIELDS, default="harmful")
    parser.add_argument("--presets", nargs=2, metavar=("A", "B"), help="compare two refusal presets on one file")
    parser.add_argument("--by", choices=["set", "subset"], help="also report per set or subset")
    parser.add_argument("--format", choices=["markdown", "json"], default="markdown")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    if args.presets:
        if len(args.samples) != 1:
            raise UserError("--presets compares two refusal presets on one samples file; give exactly one")
        report = compare_presets(args.samples[0], *args.presets, args.by)
    elif len(args.samples) == 2:
        report = compare_files(*args.samples, args.field, args.by)
    else:
        raise UserError("give two samples files, or one file and --presets A B")
    print(json.dumps(report, indent=1) if args.format == "json" else to_markdown(report))


if __name__ == "__main__":
    main()
