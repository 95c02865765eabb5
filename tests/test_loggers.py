"""Loggers from the `logger:` group: TensorBoard by default, CSV, W&B when installed, none with
trainer.logger=false; sample generations as text + images (TensorBoard) or JSON lines (CSV)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.errors import UserError
from lightning_modules.config.loading import load_config
from lightning_modules.run.loggers import build_loggers
from lightning_modules.methods.sample_log import log_samples
from vlguard_fixture import vlguard_overrides, write_vlguard

HAS_WANDB = importlib.util.find_spec("wandb") is not None


def config(tmp_path, *extra):
    return load_config("configs/demo.yaml", [f"run_dir={tmp_path / 'run'}", *extra])


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_tensorboard_is_the_default_and_groups_swap_it(tmp_path):
    (tb,) = build_loggers(config(tmp_path), tmp_path)
    assert isinstance(tb, TensorBoardLogger) and Path(tb.log_dir) == tmp_path / "tensorboard"
    (csv,) = build_loggers(config(tmp_path, "logger=csv"), tmp_path)
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path / "csv"
    both = build_loggers(config(tmp_path, "logger=many"), tmp_path)
    assert [type(lg) for lg in both] == [TensorBoardLogger, CSVLogger]
    assert build_loggers(config(tmp_path, "trainer.logger=false"), tmp_path) is False


def test_bad_logger_settings_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown logger 'mlflow'"):
        build_loggers(config(tmp_path, "logger.mlflow.x=1"), tmp_path)
    with pytest.raises(UserError, match=r"logger.csv: .*unexpected keyword argument 'colour'"):
        build_loggers(config(tmp_path, "logger=csv", "logger.csv.colour=red"), tmp_path)
    with pytest.raises(UserError, match="trainer.logger must be true or false"):
        build_loggers(config(tmp_path, "trainer.logger=tensorboard"), tmp_path)


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed")
def test_wandb_without_the_package_says_how_to_install_it(tmp_path):
    with pytest.raises(UserError, match="pip install wandb"):
        build_loggers(config(tmp_path, "logger=wandb"), tmp_path)


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_offline_logs_a_sample_table(tmp_path):
    (wb,) = build_loggers(config(tmp_path, "logger=wandb"), tmp_path)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    log_samples([wb], "val", {"unsafe_clean": [{"prompt": "p", "response": "r", "image": str(image)}]}, 0)
    wb.experiment.finish()


def test_samples_are_text_and_images_in_tensorboard_and_json_lines_in_csv(tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (600, 300), (255, 0, 0)).save(image)
    samples = {"unsafe_clean": [{"prompt": "a | b", "response": "r", "image": str(image)}],
               "safe_clean": [{"prompt": "q", "response": "s", "image": None}]}
    tb, csv = build_loggers(config(tmp_path, "logger=many"), tmp_path)
    log_samples([tb, csv], "val", samples, step=3)
    tb.experiment.flush()
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    assert {"val_samples/unsafe_clean/text_summary", "val_samples/safe_clean/text_summary"} <= set(events.Tags()["tensors"])
    (img,) = events.Images("val_samples/unsafe_clean/0")
    assert (img.width, img.height, img.step) == (256, 128, 3)  # thumbnailed, aspect kept
    rows = [json.loads(line) for line in (Path(csv.log_dir) / "val_samples.jsonl").read_text().splitlines()]
    assert [(r["eval_set"], r["prompt"], r["step"]) for r in rows] == [("unsafe_clean", "a | b", 3),
                                                                      ("safe_clean", "q", 3)]


@pytest.fixture(scope="module")
def vlguard_files(tmp_path_factory):
    return write_vlguard(tmp_path_factory.mktemp("data"), n_train=8, n_val=2, n_test=2)


@pytest.mark.slow
def test_fit_with_the_csv_logger(vlguard_files, tmp_path):
    from lightning_modules.run import training

    run_dir = tmp_path / "run"
    training.run(load_config("configs/demo.yaml", vlguard_overrides(vlguard_files, run_dir)
                        + ["logger=csv", "trainer.max_steps=2", "eval.val_at_start=true"]))
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert {"train/loss", "val/unsafe_clean/refusal_rate", "test/mirage_gap", "lr-AdamW"} <= set(metrics.columns)
    assert (run_dir / "csv" / "hparams.yaml").is_file() and not (run_dir / "tensorboard").exists()
    stages = {json.loads(line)["eval_set"] for line in (run_dir / "csv" / "val_samples.jsonl").read_text().splitlines()}
    assert stages == {"unsafe_clean", "unsafe_attacked", "safe_clean", "safe_rewritten"}
    assert (run_dir / "csv" / "test_samples.jsonl").is_file()


@pytest.mark.slow
def test_fit_without_a_logger(vlguard_files, tmp_path):
    from lightning_modules.run import training

    run_dir = tmp_path / "run"
    table = training.run(load_config("configs/demo.yaml", vlguard_overrides(vlguard_files, run_dir)
                                + ["trainer.logger=false", "trainer.max_steps=2"]))
    assert (run_dir / "results.csv").is_file() and len(table) == 4
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "csv").exists()
