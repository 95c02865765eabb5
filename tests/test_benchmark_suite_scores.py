"""The suite's utility rows and tables on lmms-lab layouts: MMBench headed by CircularEval (n =
questions, the originals' single pass beside it), POPE by the mean F1 over its categories (with
a bootstrap interval; pooled F1 and accuracy beside it), MME with both of its scores."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from benchmark_fixtures import lmms_lab_releases
from datamodules.benchmarks import read_task
from lightning_modules.analysis.suite import TaskRun, score_utility
from lightning_modules.analysis.suite_tables import suite_markdown
from metrics.samples import write_samples


def _run(tmp_path, kind, path, responses):
    examples = [dataclasses.replace(ex, extra={**ex.extra, "set": kind}) for ex in read_task(kind, path)]
    folder = tmp_path / kind
    folder.mkdir()
    write_samples(folder / "samples.jsonl", [dict(set=kind, id=ex.id, subset=ex.subset, shot=ex.shot,
                                                  prompt=ex.instruction, response=r) for ex, r in zip(examples, responses)])
    settings = SimpleNamespace(confidence=0.95, bootstrap=200)
    task = SimpleNamespace(name=kind, kind=kind)
    table = score_utility(TaskRun(task, folder, OmegaConf.create({"seed": 0}), settings, examples))
    return table.assign(task=kind)


def test_suite_rows_and_tables_use_the_reference_headlines(tmp_path):
    releases = lmms_lab_releases(tmp_path / "lmms")
    mmb = _run(tmp_path, "mmbench", releases["mmbench"], ["B", "A", "A", "B", "A"])
    pope = _run(tmp_path, "pope", releases["pope"], ["yes", "no", "yes", "yes", "no", "no"])
    mme = _run(tmp_path, "mme", releases["mme"], ["Yes", "No"])
    head = mmb[mmb["category"] == "all"].iloc[0]
    assert head["n"] == 2 and head["accuracy"] == 0.5 and head["accuracy_single"] == 1.0
    assert 0 <= head["accuracy_lo"] <= 0.5 <= head["accuracy_hi"] <= 1
    top = pope[pope["category"] == "all"].iloc[0]
    # adversarial F1 1, popular TP1 FP1 -> 2/3, random TP0 -> 0: mean 5/9; pooled TP2 FP1 FN1 -> 2/3
    assert top["f1_mean"] == pytest.approx(5 / 9) and top["f1"] == pytest.approx(2 / 3) and top["n"] == 6
    assert top["f1_mean_lo"] <= top["f1_mean"] <= top["f1_mean_hi"]
    text = suite_markdown(pd.concat([mmb, pope, mme], ignore_index=True), ["m"])
    assert "| model | accuracy | accuracy_single |" in text and "| m | 50.00 [" in text
    assert "| model | f1_mean | f1 | accuracy |" in text
    assert "| model | accuracy | perception_score | cognition_score |" in text and "| 0.00 | 200.00 |" in text
