"""Every real family at toy size through the fit CLI on a VLGuard-format directory with images: SFT, NPO
and RMU train a few steps and evaluate; the export loads from another working directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
import torch

from lightning_modules import evaluate, fit
from lightning_modules.run.export import base_model_reference
from vlguard_fixture import write_vlguard
from test_bad_inputs import TIMEOUT_S, cli_env

FAMILIES = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl")
EVAL_SETS = ["unsafe_clean", "unsafe_attacked", "safe_clean", "safe_rewritten"]


def family_args(family: str, method: str, files: dict, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", "data=vlguard", f"model=tiny-{family}", f"method={method}",
            *[f"{k}={v}" for k, v in files.items()], f"data.image_dir={Path(files['data.train_file']).parent}",
            "data.batch_size=2", "data.eval_batch_size=4", "data.max_length=256", "data.max_eval_samples=null",
            "trainer.max_steps=2", "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "eval.max_new_tokens=4",
            "eval.val_at_start=false", f"run_dir={run_dir}", f"paths.cache={run_dir.parent / 'cache'}", *extra]


@pytest.fixture(scope="module")
def vlguard_dir(tmp_path_factory):
    return write_vlguard(tmp_path_factory.mktemp("vlguard"), n_train=8, n_val=2, n_test=2)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_fits_sft_npo_rmu_and_evaluates(family, vlguard_dir, tmp_path):
    for method in ("sft", "npo", "rmu"):
        run_dir = tmp_path / method
        fit.main(family_args(family, method, vlguard_dir, run_dir))
        table = pd.read_csv(run_dir / "results.csv", index_col="eval_set")
        # 2 unsafe records + 2 safe records (a safe and an unsafe instruction each) in the test split
        assert list(table.index) == EVAL_SETS and table["n"].tolist() == [4, 4, 2, 2], (family, method)
        sums = table[["asr", "refusal_rate", "ir"]].sum(axis=1)
        assert ((sums - 1).abs() < 1e-6).all()
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        shots = OmegaConf.load(run_dir / "config.yaml").data.attack_shots  # K rewrites per unsafe query
        assert len(samples) == 4 + 4 * shots + 2 + 2 and all(isinstance(s["response"], str) for s in samples)
        config = json.loads((run_dir / "model" / "config.json").read_text())
        expected = {"llava": "llava", "llava-next": "llava_next", "qwen2-vl": "qwen2_vl",
                    "qwen2.5-vl": "qwen2_5_vl"}[family]
        assert config["model_type"] == expected
        card = (run_dir / "model" / "README.md").read_text()
        assert f": {method} on tiny-{family}" in card and "unsafe_attacked" in card
    # the evaluate command on the exported SFT model, loaded back through the Auto classes
    eval_config = tmp_path / "evaluate.yaml"
    eval_config.write_text(json.dumps({
        "defaults": ["trainer/cpu"], "name": "eval", "run_dir": str(tmp_path / "eval"),
        "model": {"name_or_path": str(tmp_path / "sft" / "model")},
        "data": {"kind": "vlguard", "eval_batch_size": 4, "max_length": 256}, "eval": {"max_new_tokens": 4},
        "evaluate": {"files": [{"name": "clean", "path": vlguard_dir["data.test_file"]}], "bootstrap": 0,
                     "judge": {"name": "keyword"}, "gaps": None}}))
    evaluate.main(["--config", str(eval_config)])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["subset"] for r in rows} == {"unsafes", "safe_unsafes", "safe_safes"}


RELOAD = """
import sys, torch
from peft import AutoPeftModel
model = AutoPeftModel.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[1, 5, 9, 13, 2]])
print(model.peft_config["default"].base_model_name_or_path)
print(float(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double().sum()))
"""


@pytest.mark.slow
def test_lora_adapter_reloads_from_another_directory_and_merges(vlguard_dir, tmp_path):
    from peft import AutoPeftModel
    from transformers import AutoModelForImageTextToText

    run_dir = tmp_path / "lora"
    fit.main(family_args("llava", "sft", vlguard_dir, run_dir, "model.finetune=lora", "export.merge_lora=true"))
    merged_dir, adapter_dir = run_dir / "model", run_dir / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()  # the base is found from any directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(adapter_dir)], cwd=elsewhere, env=cli_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, checksum = proc.stdout.split()[-2:]
    assert base == str((run_dir / "base_model").resolve())

    ids = torch.tensor([[1, 5, 9, 13, 2]])
    adapter = AutoPeftModel.from_pretrained(adapter_dir).eval()
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        a = adapter(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        m = merged(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert float(a.double().sum()) == pytest.approx(float(checksum), rel=1e-5)
    torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-4)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in adapter.named_parameters())  # it trained
    assert "library_name: transformers" in (merged_dir / "README.md").read_text()


def test_base_reference_is_absolute_or_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache" / "base").mkdir(parents=True)
    assert base_model_reference("cache/base") == str(tmp_path / "cache" / "base")
    assert base_model_reference("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert base_model_reference("tiny-qwen2-vl") is None and base_model_reference("tiny") is None
