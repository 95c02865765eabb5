"""compare's results.csv: one row per run, read back strictly, written atomically, and each row's
metrics read from the run's results.json / probes.json by name."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from core.errors import UserError
from datamodules.examples import ALL_EVAL_SETS
from core.files import atomic_write
from lightning_modules.experiments.plan import RunKey

# results.csv column -> (eval set, metric) of a run's results.json
SET_METRICS = {
    "asr_clean": ("unsafe_clean", "asr"), "asr_attacked": ("unsafe_attacked", "asr"),
    "asr_neutral": ("unsafe_neutral", "asr"), "asr_cue_removed": ("unsafe_cue_removed", "asr"),
    "rr_clean": ("safe_clean", "refusal_rate"), "rr_rewritten": ("safe_rewritten", "refusal_rate"),
    "rr_neutral": ("safe_neutral", "refusal_rate"),
    "ir_clean": ("unsafe_clean", "ir"), "ir_attacked": ("unsafe_attacked", "ir"),
    "accuracy": ("safe_clean", "accuracy"), "accuracy_rewritten": ("safe_rewritten", "accuracy"),
    "rr_unsafe_clean": ("unsafe_clean", "refusal_rate"), "rr_unsafe_attacked": ("unsafe_attacked", "refusal_rate"),
    "rr_unsafe_neutral": ("unsafe_neutral", "refusal_rate"),
    "rr_unsafe_cue_removed": ("unsafe_cue_removed", "refusal_rate"),
    # the relevance judge (an answer in the form the query asks for): the paper's notion of ASR
    "relevant_clean": ("unsafe_clean", "relevant"), "relevant_attacked": ("unsafe_attacked", "relevant"),
    "relevant_neutral": ("unsafe_neutral", "relevant"),
}
SETS = ALL_EVAL_SETS
N_COLUMNS = [f"n_{s}" for s in SETS]
# probes.json -> columns (lightning_modules.probes); NaN where a run has no probes
PROBE_COLUMNS = ["hazard_nll_clean", "hazard_nll_attacked", "hazard_nll_neutral", "asr_before_relearn", "asr_relearn",
                 "asr_relearn_benign", "attr_first_word", "attr_image", "attr_rest", "attr_end_mark"]
KEY_COLUMNS = ["sweep", "method", "world_seed", "base_seed", "seed"]
COLUMNS = (KEY_COLUMNS + ["rho"] + list(SET_METRICS) + PROBE_COLUMNS + N_COLUMNS + ["n_relearn", "wall_s", "run_dir",
                                                                                   "config_hash"])
RATE_N = {col: f"n_{s}" for col, (s, _) in SET_METRICS.items()}
RATE_N.update(asr_before_relearn="n_relearn", asr_relearn="n_relearn", asr_relearn_benign="n_relearn")


def read_results(csv: Path) -> pd.DataFrame:
    """The rows of a results.csv this command wrote; anything else is a one-line error."""
    try:
        text = csv.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{csv}: not a results.csv written by compare (not UTF-8 text); "
                        "use another run_dir or delete the file") from err
    if not text:
        return pd.DataFrame(columns=COLUMNS)
    if not text.endswith("\n"):
        raise UserError(f"{csv}: the last line is cut off mid-way (an interrupted write?); "
                        "delete that line or the file to resume")
    header = text.split("\n", 1)[0].split(",")
    if header != COLUMNS:
        extra = [c for c in header if c not in COLUMNS][:3]
        missing = [c for c in COLUMNS if c not in header][:3]
        raise UserError(f"{csv}: not a results.csv written by this compare (columns differ: unexpected "
                        f"{extra or 'none'}, missing {missing or 'none'}); use another run_dir or delete the file")
    try:
        rows = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, ValueError) as err:
        raise UserError(f"{csv}: unreadable ({str(err).splitlines()[0]}); delete the file to start over") from err
    if rows["config_hash"].isna().any() or rows["method"].isna().any():
        bad = int(rows.index[rows["config_hash"].isna() | rows["method"].isna()][0]) + 2
        raise UserError(f"{csv}: line {bad} has no method or config_hash; delete the line or the file to resume")
    return rows


def normalized(rows: list[dict]) -> pd.DataFrame:
    """The table exactly as pandas reads results.csv back (dtypes included)."""
    text = pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False)
    return pd.read_csv(io.StringIO(text))


def write_results(rows: list[dict], csv: Path) -> pd.DataFrame:
    """Written to a temporary file and renamed: a crash never leaves a half-written results.csv."""
    table = normalized(rows)
    atomic_write(csv, table.to_csv(index=False), what="compare results")
    return table


def row_key(row: dict) -> tuple:
    def norm(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v
    return tuple(norm(row[c]) for c in KEY_COLUMNS)


def key_tuple(key: RunKey) -> tuple:
    return row_key(dataclasses.asdict(key))


def metrics_row(run_dir: Path) -> dict:
    """The results.csv columns of a finished run, read from its results.json / probes.json by name."""
    if not (run_dir / "results.json").is_file():
        raise UserError(f"run {run_dir} wrote no results.json (compare needs eval.test_at_end=true)")
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    row = {}
    for col, (set_name, metric) in SET_METRICS.items():
        value = results.get(set_name, {}).get(metric)
        row[col] = math.nan if value is None else float(value)
    for set_name in SETS:
        row[f"n_{set_name}"] = results.get(set_name, {}).get("n", math.nan)
    probes_file = run_dir / "probes.json"
    probes = json.loads(probes_file.read_text(encoding="utf-8")) if probes_file.is_file() else {}
    for col in PROBE_COLUMNS:
        value = probes.get("summary", {}).get(col)
        row[col] = math.nan if value is None else float(value)
    row["n_relearn"] = probes.get("relearn", {}).get("hazard", {}).get("n_eval", math.nan)
    return row


def world_rho(run_dir: Path) -> float:
    """The world's rho of a finished run (NaN for data without one), from its saved config."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    value = OmegaConf.select(cfg, "data.world.rho", default=None)
    return math.nan if value is None else float(value)




# A finished run's own record of the planned run it is (written by the job that ran it), so that a
# compare that died while its jobs ran still finds them (`adopted_run`).
RUN_MARKER = "compare_run.json"


def write_run_marker(run_dir: Path, digest: str, wall_s: float) -> None:
    atomic_write(run_dir / RUN_MARKER, json.dumps({"config_hash": digest, "wall_s": round(wall_s, 1)}) + "\n",
                 what="compare run marker")


def adopted_run(planned_dir: Path, digest: str) -> tuple[Path, float] | None:
    """A finished run of this very run config in `planned_dir` or one of its `_N` siblings (its
    directory and wall time), else None."""
    candidate, n = planned_dir, 1
    while candidate.is_dir():
        try:
            marker = json.loads((candidate / RUN_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = {}
        if marker.get("config_hash") == digest and (candidate / "results.json").is_file():
            return candidate, float(marker.get("wall_s", math.nan))
        candidate, n = planned_dir.with_name(f"{planned_dir.name}_{n}"), n + 1
    return None
