"""End to end: `fit` on a small Mirage World logs every mirage tag and writes the result table."""

import json
import os

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_modules.run import training, run_dir as run_dirs
from metrics.gaps import GAPS
from lightning_modules.config.loading import load_config
from conftest import SMALL

# The world's eval sets by name (an interface: compare reads them from results.json).
EVAL_SETS = ("unsafe_clean", "unsafe_attacked", "unsafe_neutral", "unsafe_cue_removed",
             "safe_clean", "safe_rewritten", "safe_neutral")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    overrides = SMALL + [f"paths.cache={tmp_path_factory.getbasetemp() / 'cache'}",
                         f"run_dir={tmp_path_factory.mktemp('run')}"]
    cfg = load_config("configs/demo.yaml", overrides)
    return cfg, training.run(cfg)


@pytest.mark.slow
def test_fit_logs_mirage_curves_and_writes_results(finished_run):
    cfg, table = finished_run
    from pathlib import Path

    run_dir = Path(cfg.run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {f"val/{s}/{k}" for s in EVAL_SETS for k in ("refusal_rate", "asr", "ir")}
    expected |= {f"val/{g}" for g in GAPS} | {"val/safe_clean/accuracy", "train/loss"}
    assert expected <= scalars, expected - scalars
    # step 0 (before training) plus the validations at steps 2 and 4
    assert len(events.Scalars("val/mirage_gap")) >= 3
    for tag in expected - {"train/loss"}:
        assert all(0 <= e.value <= 1 or "gap" in tag for e in events.Scalars(tag))
    assert any(t.startswith("val_samples/") for t in events.Tags()["tensors"])

    csv = pd.read_csv(run_dir / "results.csv", index_col="eval_set")
    assert list(csv.index) == list(EVAL_SETS)
    assert {"asr", "refusal_rate", "ir", "accuracy", "n"} <= set(csv.columns)
    pd.testing.assert_frame_equal(csv, table, check_dtype=False, check_names=False)
    for name in EVAL_SETS:  # ASR + IR + RR = 1 on every set
        assert csv.loc[name, ["asr", "refusal_rate", "ir"]].sum() == pytest.approx(1.0)

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == int(csv["n"].sum())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "model" / "config.json").is_file()
    assert run_dirs.RUN_DIR_ENV not in os.environ  # the next run in this process picks its own directory


@pytest.mark.slow
def test_metrics_are_computed_from_the_generations(finished_run):
    """The table is a pure function of samples.jsonl: recount it."""
    cfg, table = finished_run
    from pathlib import Path

    samples = pd.read_json(Path(cfg.run_dir) / "samples.jsonl", lines=True)
    for name, rows in samples.groupby("subset"):
        assert table.loc[name, "n"] == len(rows)
        assert table.loc[name, "refusal_rate"] == pytest.approx(rows["refusal"].mean())
        assert table.loc[name, "asr"] == pytest.approx((rows["harmful"] & ~rows["refusal"]).mean())
        if name.startswith("unsafe"):  # the relevance judge: every unsafe world query is judged
            assert table.loc[name, "relevant"] == pytest.approx(rows["relevant"].astype(bool).mean())
        else:
            assert pd.isna(table.loc[name, "relevant"]) and rows["relevant"].isna().all()


def test_ranks_started_by_torchrun_share_rank_zeros_locked_run_dir(tmp_path, monkeypatch):
    """torchrun / SLURM start every rank as its own process: only rank 0 locks the run directory,
    the others use it (before, every rank but the first failed with "in use by another run")."""
    cfg = load_config("configs/demo.yaml", [f"run_dir={tmp_path / 'run'}"])
    # prepare_run_dir exports the run dir for DDP children: pop it ourselves (a monkeypatch.delenv
    # of a variable set after the test began would restore it at teardown, into later tests).
    os.environ.pop(run_dirs.RUN_DIR_ENV, None)
    monkeypatch.setenv("RANK", "0")
    try:
        assert run_dirs.prepare_run_dir(cfg) == tmp_path / "run"  # rank 0: created and locked
        for rank in ("1", "7"):
            os.environ.pop(run_dirs.RUN_DIR_ENV, None)
            monkeypatch.setenv("RANK", rank)
            assert run_dirs.prepare_run_dir(cfg) == tmp_path / "run"
    finally:
        run_dirs.release_run_dir()
        os.environ.pop(run_dirs.RUN_DIR_ENV, None)


def test_the_run_dir_actually_used_travels_in_the_config(tmp_path, monkeypatch):
    """A finished run's directory gets a `_N` sibling; the config (config.yaml, the hparams, the judge
    cache's default place) must name the sibling, not the finished run."""
    cfg = load_config("configs/demo.yaml", [f"run_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text("eval_set,asr\n")

    def stop(cfg, run_dir):
        raise RuntimeError("stop after the run dir is chosen")

    monkeypatch.setattr(training, "resolve_checkpoint", stop)
    with pytest.raises(RuntimeError, match="stop after"):
        training.run(cfg)
    assert cfg.run_dir == str(tmp_path / "run_1")
    assert run_dirs.RUN_DIR_ENV not in os.environ
