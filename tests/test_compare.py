"""The compare command in a tiny setting: two methods, one seed, a few steps."""

import pandas as pd
import pytest

from conftest import SMALL
from lightning_modules import compare
from lightning_modules.config import load_config


def test_compare_writes_table_summary_and_plots(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cache = tmp_path_factory.getbasetemp() / "cache"
    overrides = [f"compare.overrides=[{','.join(SMALL)}]", "compare.methods=[base,sft]", "compare.seeds=[0]",
                 "compare.rhos=[0.9,1.0]", f"run_dir={out}", f"paths.cache={cache}"]
    cfg = load_config("configs/experiment/mirage_compare.yaml", overrides)
    compare.run(cfg)
    results = pd.read_csv(out / "results.csv")
    assert ["method", "seed", "asr_clean", "asr_attacked", "rr_clean", "rr_rewritten", "ir_attacked",
            "accuracy"] == [c for c in results.columns if c in compare.COLUMNS[1:9]]
    assert len(results) == 4 and set(results.method) == {"base", "sft"} and set(results.rho) == {0.9, 1.0}
    for _, row in results.iterrows():  # each row is the run's own results.csv
        run = pd.read_csv(out / f"rho{row.rho}" / row.method / "seed0" / "results.csv", index_col="eval_set")
        assert row.asr_attacked == pytest.approx(run.loc["unsafe_attacked", "asr"])
        assert row.rr_rewritten == pytest.approx(run.loc["safe_rewritten", "refusal_rate"])
    assert "| 0.9 | base | 1 |" in (out / "summary.md").read_text()
    assert (out / "bars_rho0.9.png").stat().st_size > 1000
    assert (out / "gap_vs_rho.png").stat().st_size > 1000
    # rerunning keeps finished runs instead of training them again
    before = (out / "results.csv").stat().st_mtime_ns
    compare.run(cfg)
    assert len(pd.read_csv(out / "results.csv")) == 4
    assert (out / "results.csv").stat().st_mtime_ns == before


def test_unknown_compare_key_is_one_line():
    with pytest.raises(Exception, match="unknown config key 'compare.metods'"):  # found by load_config
        compare.parse_settings(load_config("configs/experiment/mirage_compare.yaml", ["compare.metods=[sft]"]))
