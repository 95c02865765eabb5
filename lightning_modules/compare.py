"""Every method of an experiment family over a seed stack (and optionally a swept key): the
paper's Table 1, measured with intervals over worlds.

    python -m lightning_modules.compare --config configs/experiment/mirage_compare.yaml [key=value ...]

Each run is an ordinary `fit` run of the family's experiment file (`compare.experiment`, e.g.
`mirage_{method}` or `vlguard_{method}`) with `compare.overrides` and the command line's own
top-level overrides applied. The seed stack varies the world (`data.world.seed`, listed in
`compare.world_seeds`), the tiny base (`base.seed`, `compare.base_seeds`) and the alignment run
(`seed`, `compare.seeds`); `base` is the unaligned base model, evaluated once per (swept value,
world, base seed). `data.world.seed=S`,
`base.seed=S` or `seed=S` on the command line replace that list by [S].

Writes into `run_dir`: `results.csv` (one row per run, rates as fractions, NaN where a run has
no such eval set), `summary.md` / `summary.json` (mean and interval per method: t over worlds,
t over runs within one world, or Wilson for one run), and the figures of `lightning_modules.
compare_plots`. A rerun resumes: rows whose run config is unchanged are kept; a changed one is
refused (`compare.on_stale=refuse`) or run again into a fresh directory (`on_stale=redo`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import OmegaConf

from core.errors import UserError, cli_main
from core.files import atomic_write
from core.records import strict_json
from core.schema import parse_section, setting
from lightning_modules import fit
from lightning_modules.config import CONFIG_ROOT, config_cli, load_config, to_yaml
from lightning_modules.parallel_runs import interleave, process_pool_available, run_parallel
from metrics.tables import t_interval, wilson_interval

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
SETS = ("unsafe_clean", "unsafe_attacked", "unsafe_neutral", "unsafe_cue_removed", "safe_clean", "safe_rewritten",
        "safe_neutral")
N_COLUMNS = [f"n_{s}" for s in SETS]
# probes.json -> columns (lightning_modules.probes); NaN where a run has no probes
PROBE_COLUMNS = ["hazard_nll_clean", "hazard_nll_attacked", "hazard_nll_neutral", "asr_before_relearn", "asr_relearn",
                 "asr_relearn_benign", "attr_first_word", "attr_image", "attr_rest", "attr_end_mark"]
KEY_COLUMNS = ["sweep", "method", "world_seed", "base_seed", "seed"]
COLUMNS = (KEY_COLUMNS + ["rho"] + list(SET_METRICS) + PROBE_COLUMNS + N_COLUMNS + ["n_relearn", "wall_s", "run_dir",
                                                                                   "config_hash"])
# paired differences per run, summarised like the metrics
GAPS = {"mirage_gap": ("asr_attacked", "asr_clean"), "neutral_gap": ("asr_neutral", "asr_clean"),
        "cue_removed_gap": ("asr_cue_removed", "asr_clean"), "relevant_gap": ("relevant_attacked", "relevant_clean"),
        "relevant_neutral_gap": ("relevant_neutral", "relevant_clean"),
        "overprudence_gap": ("rr_rewritten", "rr_clean"), "neutral_overprudence_gap": ("rr_neutral", "rr_clean")}
RATE_N = {col: f"n_{s}" for col, (s, _) in SET_METRICS.items()}
RATE_N.update(asr_before_relearn="n_relearn", asr_relearn="n_relearn", asr_relearn_benign="n_relearn")
STACK_KEYS = {"seed": "seeds", "base.seed": "base_seeds", "data.world.seed": "world_seeds"}
RUN_KEYS = ("run_dir", "name", "resume")  # set per run by compare itself
UNHASHED = ("run_dir", "name", "resume", "paths", "threads")  # what cannot change a run's numbers


@dataclasses.dataclass
class CompareSettings:
    methods: list[str] = setting(doc="base and the method names", factory=lambda: ["base", "sft", "ga", "graddiff",
                                                                                 "npo", "simnpo", "rmu"])
    experiment: str = setting("mirage_{method}", "configs/experiment/<this>.yaml per method (base uses sft's)")
    seeds: list[int] = setting(doc="alignment seeds (seed)", factory=lambda: [0, 1, 2], ge=0)
    world_seeds: Optional[list[int]] = setting(None, "world seeds (data.world.seed); null: the experiment's", ge=0)
    base_seeds: Optional[list[int]] = setting(None, "tiny-base seeds (base.seed); null: the experiment's", ge=0)
    dev_world_seeds: list[int] = setting(doc="worlds tuning may use, never reported as held out", factory=list, ge=0)
    world_overrides: dict[int, list[str]] = setting(doc="world seed -> key=value for the runs on that world "
                                                        "(e.g. its cue words)", factory=dict)
    sweep_key: Optional[str] = setting(None, "any dotted config key swept over sweep_values, e.g. data.world.rho")
    sweep_values: list[Any] = setting(doc="values of sweep_key", factory=list)
    overrides: list[str] = setting(doc="key=value applied to every run", factory=list)
    split: str = setting("test", "test: the reported table; val: for choosing hyperparameters", choices=("test", "val"))
    on_stale: str = setting("refuse", "a finished row whose run config changed", choices=("refuse", "redo"))
    confidence: float = setting(0.95, "interval level", gt=0, lt=1)
    jobs: int = setting(1, "runs at once, each in its own process with `threads` threads (its output in "
                           "<run_dir>/logs/); 1: one after another, in this process", ge=1)


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


def experiment_path(settings: CompareSettings, method: str) -> Path:
    name = settings.experiment.format(method="sft" if method == "base" else method)
    path = CONFIG_ROOT / "experiment" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown method '{method}' in compare.methods for compare.experiment="
                        f"{settings.experiment} (no {path.relative_to(CONFIG_ROOT.parent)})")
    return path


def plan(settings: CompareSettings, common: list[str]) -> list[RunKey]:
    """Every run of the comparison, base once per (sweep value, world, base seed)."""
    probe = load_config(experiment_path(settings, settings.methods[0]), list(settings.overrides) + common)
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
                    for seed in ([None] if method == "base" else settings.seeds):
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
    if key.method == "base":  # the unaligned model: evaluation only
        own += ["trainer.max_steps=0", "eval.val_at_start=false"]
    cfg = load_config(experiment_path(settings, key.method), list(settings.overrides) + world + common + own)
    if settings.sweep_key and OmegaConf.select(cfg, settings.sweep_key, default="<missing>") == "<missing>":
        raise UserError(f"compare.sweep_key '{settings.sweep_key}' is not a key of the run config")
    return cfg


def flat(cfg) -> dict[str, Any]:
    """Dotted key -> value of a config, without the keys that cannot change a run's numbers."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in UNHASHED}, "")
    return out


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(flat(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def fresh_run_dir(path: Path) -> Path:
    """`path`, or `path_N` when a finished run is already there (fit would take the same suffix)."""
    n, candidate = 1, path
    while fit.is_finished(candidate):
        candidate, n = path.with_name(f"{path.name}_{n}"), n + 1
    return candidate


# -- results.csv ------------------------------------------------------------------------------------
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


def _key_of(row: dict) -> tuple:
    def norm(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v
    return tuple(norm(row[c]) for c in KEY_COLUMNS)


def key_tuple(key: RunKey) -> tuple:
    return _key_of(dataclasses.asdict(key))


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


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys of both configs whose values differ. A key only one side has is a schema change of the
    code (a new setting at its default), not a change of the run; model.name_or_path is rewritten
    by fit to the cached base's path."""
    return sorted(k for k in old.keys() & new.keys() if old[k] != new[k] and k != "model.name_or_path")


# -- summary ----------------------------------------------------------------------------------------
def summarize(results: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and interval per (sweep, method). Runs are averaged within a world first; the interval
    is Student-t over worlds (>= 2 worlds), t over runs (one world), or Wilson (one run, rates)."""
    results = results.copy()
    for gap, (a, b) in GAPS.items():
        results[gap] = results[a] - results[b]
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
    (out / "summary.md").write_text(text, encoding="utf-8")
    rows = json.loads(summary.to_json(orient="records"))  # plain Python values, NaN as null
    atomic_write(out / "summary.json", strict_json({"settings": dataclasses.asdict(settings), "rows": rows}, indent=1),
                 what="compare summary")
    return text


# -- the command ------------------------------------------------------------------------------------
def run(cfg, command_line: Optional[list[str]] = None) -> pd.DataFrame:
    """Run (or resume) every planned run and write the tables and figures; `command_line` holds the
    compare command's own key=value overrides, which reach every run."""
    settings = parse_settings(cfg)
    common = apply_command_line(settings, list(command_line or []))
    common.append(f"paths.cache={cfg.paths.cache}")
    if cfg.threads:
        common.append(f"threads={cfg.threads}")
    out = Path(cfg.run_dir)
    csv = out / "results.csv"
    previous = read_results(csv).to_dict("records") if csv.exists() else []
    done = {_key_of(r): r for r in previous}
    keys = plan(settings, common)
    dev = sorted({k.world_seed for k in keys} & set(settings.dev_world_seeds))
    if dev and settings.split == "test":
        print(f"compare: world seed(s) {dev} are dev worlds (compare.dev_world_seeds), used to choose "
              "hyperparameters: this table is not a held-out result")
    # Every planned config first: a stale row is refused before anything runs.
    planned = []
    for key in keys:
        path = run_path(out, key, settings.sweep_key)
        row = done.get(key_tuple(key))
        cfg_run = run_config(settings, key, common, path)
        digest = config_hash(cfg_run)
        if row is not None and row["config_hash"] != digest:
            old_yaml = out / row["run_dir"] / "config.yaml"
            diff = changed_keys(flat(OmegaConf.load(old_yaml)), flat(cfg_run)) if old_yaml.is_file() else ["?"]
            changed = ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
            if not diff:  # the same run under a grown schema: keep it, under the new hash
                row = {**row, "config_hash": digest}
        if row is not None and row["config_hash"] != digest:
            if settings.on_stale == "refuse":
                raise UserError(f"{csv}: the finished run ({key.label()}) was made with another run config "
                                f"(changed: {changed}); pass compare.on_stale=redo to run it again, or use a new run_dir")
            print(f"compare: redoing ({key.label()}): its run config changed ({changed})")
            row = None
        planned.append((key, path, digest, row, cfg_run))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    dropped = len(done.keys() - {key_tuple(k) for k in keys})
    if dropped:
        print(f"compare: {dropped} earlier row(s) are not in this plan and leave results.csv (their run dirs stay)")
    rows = [row for _, _, _, row, _ in planned if row is not None]
    kept = len(rows)
    todo = []  # (key, digest, run config) of each run still to do, in its own fresh directory
    for key, path, digest, row, cfg_run in planned:
        if row is None:
            cfg_run.run_dir = str(fresh_run_dir(path))  # not hashed: the config as planned, moved
            todo.append((key, digest, cfg_run))

    def record(key: RunKey, digest: str, cfg_run, wall: float) -> None:
        run_dir = Path(cfg_run.run_dir)
        rows.append({**dataclasses.asdict(key), **metrics_row(run_dir), "rho": _rho(run_dir),
                     "wall_s": round(wall, 1), "run_dir": str(run_dir.relative_to(out)), "config_hash": digest})
        write_results(rows, csv)  # after every run

    jobs = settings.jobs
    if jobs > 1 and len(todo) > 1 and (why := process_pool_available()):
        print(f"compare: compare.jobs={jobs} needs worker processes, which cannot start here ({why}); "
              "running the runs one after another")
        jobs = 1
    if jobs == 1 or len(todo) <= 1:
        for key, digest, cfg_run in todo:
            start = time.perf_counter()
            fit.run(cfg_run)  # sets cfg_run.run_dir to the directory it used
            record(key, digest, cfg_run, time.perf_counter() - start)
    else:
        # Runs of different worlds first: runs of one world wait for its base to be built.
        todo = interleave(todo, lambda item: (item[0].world_seed, item[0].base_seed))
        total = len(todo)
        print(f"compare: {total} runs, {jobs} at a time; each run's output: {out / 'logs'}")

        def finished(item, wall: float) -> None:
            record(*item, wall)
            print(f"compare: [{len(rows) - kept}/{total}] {item[0].label()}: {wall:.0f} s", flush=True)

        tasks = [(item, item[2], out / "logs" / f"{Path(item[2].run_dir).relative_to(out)}.log") for item in todo]
        run_parallel(tasks, jobs, finished, lambda item: item[0].label())
    order = {key_tuple(k): i for i, (k, *_rest) in enumerate(planned)}
    rows.sort(key=lambda r: order[_key_of(r)])
    results = write_results(rows, csv)
    summary = summarize(results, settings.confidence)
    from lightning_modules.compare_plots import attribution_by_method, plot_all

    text = write_summary(summary, settings, out, attribution_by_method(results, out))
    plot_all(results, summary, settings, out)
    print(f"\n{text}\nwritten to {out}")
    return results


def _rho(run_dir: Path) -> float:
    """The world's rho of a finished run (NaN for data without one), from its saved config."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    value = OmegaConf.select(cfg, "data.world.rho", default=None)
    return math.nan if value is None else float(value)


@cli_main
def main(argv: list[str]) -> None:
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    config_cli(argv, "python -m lightning_modules.compare", __doc__.splitlines()[0],
               "configs/experiment/mirage_compare.yaml", lambda cfg: run(cfg, overrides))


if __name__ == "__main__":
    main()
