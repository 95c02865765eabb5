"""VLGuard's SFT baselines resolve to the values of the scripts they cite (table-driven), and the
post-hoc mixture draws exactly `general_samples` general rows, each at most once."""

import json

import pytest

from core.errors import UserError
from core.paths import CONFIG_ROOT
from lightning_modules.config.loading import load_config

V1 = ("A chat between a curious user and an artificial intelligence assistant. "
      "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# finetune_task.sh / finetune.sh: --version v1 (:6), --image_aspect_ratio pad (:14 / :15), global batch 128,
# VLGuard's convert_to_llava_format.py (the whole train.json, one two-turn conversation per safe image).
LLAVA_SCRIPT = {"data.system_prompt": V1, "data.image_aspect_ratio": "pad", "data.effective_batch_size": 128,
                "data.whole_train_file": True, "data.safe_records": "conversation", "data.overlong": "truncate",
                "seed": 42}
# recipe -> the resolved values its comments cite (LLaVA scripts/v1_5/finetune_task.sh / finetune.sh).
EXPECTED = {
    "vlguard_sft_posthoc": {"model.finetune": "full", "optim.lr": 2.0e-5, "optim.weight_decay": 0.0,
                            "optim.warmup_ratio": 0.03, "optim.scheduler": "cosine", "trainer.max_epochs": 1,
                            "data.batch_size": 16, "data.max_length": 2048, "data.general_samples": 5000,
                            "method.name": "sft", "model.name_or_path": "llava-hf/llava-1.5-7b-hf", **LLAVA_SCRIPT},
    "vlguard_sft_mixed": {"model.finetune": "full", "optim.lr": 2.0e-5, "optim.weight_decay": 0.0,
                          "optim.warmup_ratio": 0.03, "optim.scheduler": "cosine", "trainer.max_epochs": 1,
                          "data.batch_size": 16, "data.max_length": 2048, "method.name": "sft", **LLAVA_SCRIPT},
}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("recipe", EXPECTED)
def test_recipe_resolves_to_its_cited_value(recipe, tmp_path):
    overrides = [f"run_dir={tmp_path}", f"data.general_file={tmp_path}/general.json"]
    if recipe == "vlguard_sft_mixed":  # left for the user: the start point and the whole 665K file
        overrides += [f"model.name_or_path={tmp_path}/vicuna-llava", "data.general_samples=665000"]
    cfg = load_config(CONFIG_ROOT / "experiment" / f"{recipe}.yaml", overrides)
    assert {key: _get(cfg, key) for key in EXPECTED[recipe]} == EXPECTED[recipe]  # one load, every key


def _datamodule(tmp_path, general_samples):
    from omegaconf import OmegaConf

    from datamodules.safety import DataFiles, SafetyDataModule

    def record(i, safe):
        if safe:
            return {"id": f"g{i}", "image": None, "safe": True, "instr-resp": [
                {"safe_instruction": f"what is {i}?", "response": f"it is {i}."},
                {"unsafe_instruction": f"share harm {i}", "response": "i cannot help."}]}
        return {"id": f"u{i}", "image": None, "safe": False, "instr-resp": [
            {"instruction": f"share harm {i}", "response": "i cannot help."}]}

    train = tmp_path / "train.json"
    train.write_text(json.dumps([record(i, False) for i in range(3)]))
    general = tmp_path / "general.json"
    general.write_text(json.dumps([record(i, True) for i in range(10)] + [record(99, False)]))
    files = DataFiles(train=train, val=train, test=None, image_dir=tmp_path, compliance_cue="What",
                      refusal_cue="Share", general=general)
    cfg = OmegaConf.create({"general_ratio": 0.0, "general_samples": general_samples, "image_mode": "none"})
    return SafetyDataModule(cfg, files, processor=None, seed=0)


def test_general_samples_draws_that_many_distinct_safe_rows(tmp_path):
    rows = _datamodule(tmp_path, 4).train_dataset()
    general = rows[3:]
    assert len(rows) == 7 and len({r.id for r in general}) == 4 and all(r.safe for r in general)
    assert [r.id for r in _datamodule(tmp_path, 4).train_dataset()] == [r.id for r in rows]  # seeded


def test_general_samples_beyond_the_file_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="general_samples=11 .* only 10 safe rows"):
        _datamodule(tmp_path, 11).train_dataset()
