"""Every method on the Mirage World, over seeds and over rho: the paper's Table 1, measured.

    python -m lightning_modules.compare --config configs/experiment/mirage_compare.yaml [key=value ...]

Each (rho, method, seed) is an ordinary `fit` run of `configs/experiment/mirage_<method>.yaml`
(its own TensorBoard log and results), all from one cached base per base corpus. `base` is the
unaligned base model itself (no training). Writes into the compare directory:
`results.csv` (one row per run), `summary.md` (mean ± 95% CI per method and rho), `bars.png`
(clean vs rewritten per method) and, with several rho values, `gap_vs_rho.png`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from lightning_modules import fit
from lightning_modules.config import CONFIG_ROOT, config_cli, load_config, to_yaml
from core.errors import UserError, cli_main

COLUMNS = ["rho", "method", "seed", "asr_clean", "asr_attacked", "rr_clean", "rr_rewritten",
           "ir_attacked", "accuracy", "rr_unsafe_clean", "rr_unsafe_attacked", "accuracy_rewritten", "wall_s"]
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclasses.dataclass
class CompareSettings:
    methods: list[str] = dataclasses.field(default_factory=lambda: ["base", "sft", "ga", "graddiff", "npo",
                                                                     "simnpo", "rmu"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    rhos: list[float] = dataclasses.field(default_factory=lambda: [0.9])
    overrides: list[str] = dataclasses.field(default_factory=list)  # applied to every run
    split: str = "test"  # test: the reported table; val: for choosing hyperparameters


def parse_settings(cfg) -> CompareSettings:
    values = OmegaConf.to_container(cfg.compare, resolve=True)
    known = {f.name for f in dataclasses.fields(CompareSettings)}
    for key in values:
        if key not in known:
            raise UserError(f"unknown config key 'compare.{key}'; known: {', '.join(sorted(known))}")
    settings = CompareSettings(**values)
    if settings.split not in ("test", "val"):
        raise UserError(f"compare.split must be 'test' or 'val', got '{settings.split}'")
    return settings


def run_config(method: str, seed: int, rho: float, common: list[str], out: Path, split: str):
    """The fit config of one run: the method's own experiment file, plus the shared overrides."""
    name = "sft" if method == "base" else method
    path = CONFIG_ROOT / "experiment" / f"mirage_{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown method '{method}' in compare.methods (no {path.relative_to(CONFIG_ROOT.parent)})")
    overrides = common + [f"seed={seed}", f"data.world.rho={rho}", f"run_dir={out / f'rho{rho}' / method / f'seed{seed}'}",
                          f"name={method}", "resume=null"]
    if method == "base":  # the unaligned model: evaluation only
        overrides += ["trainer.max_steps=0", "eval.val_at_start=false"]
    overrides.append(f"eval.test_split={split}")  # val: choose hyperparameters, never on test
    return load_config(path, overrides)


def row_from_table(table: pd.DataFrame) -> dict:
    return {
        "asr_clean": table.loc["unsafe_clean", "asr"], "asr_attacked": table.loc["unsafe_attacked", "asr"],
        "rr_clean": table.loc["safe_clean", "refusal_rate"], "rr_rewritten": table.loc["safe_rewritten", "refusal_rate"],
        "ir_attacked": table.loc["unsafe_attacked", "ir"], "accuracy": table.loc["safe_clean", "accuracy"],
        "rr_unsafe_clean": table.loc["unsafe_clean", "refusal_rate"],
        "rr_unsafe_attacked": table.loc["unsafe_attacked", "refusal_rate"],
        "accuracy_rewritten": table.loc["safe_rewritten", "accuracy"],
    }


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval half-width per (rho, method) over seeds."""
    metrics = [c for c in COLUMNS if c not in ("rho", "method", "seed", "wall_s")]
    results = results.assign(mirage_gap=results.asr_attacked - results.asr_clean,
                             overprudence_gap=results.rr_rewritten - results.rr_clean)
    metrics += ["mirage_gap", "overprudence_gap"]
    grouped = results.groupby(["rho", "method"], sort=False)[metrics]
    mean, std, n = grouped.mean(), grouped.std(ddof=1), grouped.count()
    half = std * n.apply(lambda col: col.map(lambda k: T95.get(k - 1, 1.96) if k > 1 else float("nan")))
    half = half / n.pow(0.5)
    return mean.join(half.add_suffix("_ci95")).join(n[["asr_clean"]].rename(columns={"asr_clean": "n_seeds"}))


def summary_markdown(summary: pd.DataFrame) -> str:
    cols = [("asr_clean", "ASR clean"), ("asr_attacked", "ASR attacked"), ("rr_clean", "RR benign clean"),
            ("rr_rewritten", "RR benign rewritten"), ("ir_attacked", "IR attacked"), ("accuracy", "accuracy")]
    lines = ["| rho | method | seeds | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for (rho, method), row in summary.iterrows():
        cells = []
        for key, _ in cols:
            ci = row[f"{key}_ci95"]
            cells.append(f"{100 * row[key]:.1f}" + ("" if pd.isna(ci) else f" ± {100 * ci:.1f}"))
        lines.append(f"| {rho} | {method} | {int(row['n_seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(percent; ± is the 95% t-interval half-width over seeds)\n"


def plot(summary: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for rho, part in summary.groupby(level="rho", sort=False):
        part = part.droplevel("rho")
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, (clean, rewritten, title) in zip(axes, [("asr_clean", "asr_attacked", "ASR on unsafe queries"),
                                                       ("rr_clean", "rr_rewritten", "refusal on benign queries")]):
            x = range(len(part))
            ax.bar([i - 0.2 for i in x], 100 * part[clean], 0.4, yerr=100 * part[f"{clean}_ci95"].fillna(0),
                   label="clean")
            ax.bar([i + 0.2 for i in x], 100 * part[rewritten], 0.4, yerr=100 * part[f"{rewritten}_ci95"].fillna(0),
                   label="one-word rewrite")
            ax.set_xticks(list(x), part.index, rotation=20)
            ax.set_ylim(0, 100)
            ax.set_ylabel("%")
            ax.set_title(title)
            ax.legend()
        fig.suptitle(f"Mirage World, rho={rho}")
        fig.tight_layout()
        path = out / ("bars.png" if len(summary.index.unique("rho")) == 1 else f"bars_rho{rho}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if len(summary.index.unique("rho")) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, part in summary.groupby(level="method", sort=False):
            part = part.droplevel("method").sort_index()
            ax.errorbar(part.index, 100 * part["mirage_gap"], yerr=100 * part["mirage_gap_ci95"].fillna(0),
                        marker="o", capsize=3, label=method)
        ax.set_xlabel("rho (share of safe training queries starting with the compliance cue)")
        ax.set_ylabel("mirage gap: ASR attacked - clean (points)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gap_vs_rho.png", dpi=110)
        plt.close(fig)
        written.append(out / "gap_vs_rho.png")
    return written


def run(cfg) -> pd.DataFrame:
    settings = parse_settings(cfg)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    common = list(settings.overrides) + [f"paths.cache={cfg.paths.cache}"]
    csv = out / "results.csv"
    rows = pd.read_csv(csv).to_dict("records") if csv.exists() else []  # a rerun keeps finished runs
    done = {(r["rho"], r["method"], r["seed"]) for r in rows}
    for rho in settings.rhos:
        for method in settings.methods:
            for seed in settings.seeds:
                if (rho, method, seed) in done:
                    continue
                run_cfg = run_config(method, seed, rho, common, out, settings.split)
                start = time.perf_counter()
                table = fit.run(run_cfg)
                rows.append({"rho": rho, "method": method, "seed": seed, **row_from_table(table),
                             "wall_s": round(time.perf_counter() - start, 1)})
                pd.DataFrame(rows, columns=COLUMNS).to_csv(csv, index=False)  # after every run
    results = pd.DataFrame(rows, columns=COLUMNS)
    summary = summarize(results)
    (out / "summary.md").write_text(summary_markdown(summary))
    plot(summary, out)
    print(f"\n{summary_markdown(summary)}\nwritten to {out}")
    return results


@cli_main
def main(argv: list[str]) -> None:
    config_cli(argv, "python -m lightning_modules.compare", __doc__.splitlines()[0],
               "configs/experiment/mirage_compare.yaml", run)


if __name__ == "__main__":
    main()
