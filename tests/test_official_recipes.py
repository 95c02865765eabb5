"""The four official recipes resolve to the official scripts' values (OPTML-Group/VLM-Safety-Unlearn
at 1f89239f: scripts/v1_5/finetune_unlearn{,_lora,_npo}.sh and the trainers), read back from
`fit --print-config` as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from models.chat_templates import LLAVA_V1_EVAL_SYSTEM, LLAVA_V1_SYSTEM

# LLaVA c121f04 llava/conversation.py:242-244 (conv_vicuna_v1, "v1"), copied by hand: the training prompt.
CONV_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SHARED = {"model.dtype": "bfloat16", "model.gradient_checkpointing": True, "data.image_aspect_ratio": "pad",
          "data.system_prompt": CONV_VICUNA_V1, "data.max_length": 2048, "optim.weight_decay": 0.0,
          "optim.warmup_ratio": 0.03, "optim.scheduler": "cosine",
          "seed": 42,  # the HF Trainer's default seed: the scripts pass none
          "data.whole_train_file": True,  # R2: the whole train.json (split_forget_retain.py:47-68)
          "data.overlong": "truncate",  # R7: llava_arch.py:274-277
          "data.forget_retain.separate_retain_ce": True}  # R8: the trainer's own retain iterator
LORA = {"model.finetune": "lora", "model.lora.r": 128, "model.lora.alpha": 256, "model.lora.dropout": 0.05,
        "model.lora.modules_to_save": ["multi_modal_projector"], "optim.lr": 1.1e-5, "trainer.max_epochs": 10,
        "data.batch_size": 8, "data.effective_batch_size": 64}
OFFICIAL = {
    "vlguard_npo_full": {"model.finetune": "full", "optim.lr": 5.0e-7, "trainer.max_epochs": 1, "data.batch_size": 1,
                         "data.effective_batch_size": 8, "method.name": "npo", "method.beta": 0.9,
                         "method.normalization": "batch_mean_ce", "method.retain_npo_alpha": 1.0,
                         "method.retain_weight": 1.0},
    "vlguard_npo_lora": {**LORA, "method.name": "npo", "method.beta": 0.7, "method.normalization": "batch_mean_ce",
                         "method.retain_npo_alpha": 0.0, "method.retain_weight": 1.0},
    "vlguard_rmu_full": {"model.finetune": "full", "optim.lr": 1.0e-6, "trainer.max_epochs": 10, "data.batch_size": 1,
                         "data.effective_batch_size": 8, "method.name": "rmu", "method.layer": 7,
                         "method.train_layers": [5, 6, 7], "method.param_pattern": r"mlp\.down_proj\.",
                         "method.train_projector": True, "method.steering_coeff": 10, "method.alpha": 1.0,
                         "method.retain_weight": 1.0, "method.positions": "all", "method.retain_iterator": "once"},
    "vlguard_rmu_lora": {**LORA, "method.name": "rmu", "method.layer": 15, "method.train_layers": "all",
                         "method.train_projector": True, "method.steering_coeff": 10, "method.alpha": 0.0,
                         "method.retain_weight": 1.2, "method.positions": "all"},
}


def lookup(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


@pytest.fixture(scope="module")
def printed() -> dict[str, dict]:
    """Each recipe's `--print-config`, one interpreter for all four (the command's own code path)."""
    code = ("import sys\nfrom lightning_modules.fit import main\n"
            "for name in sys.argv[1:]:\n"
            "    print('=== ' + name, flush=True)\n"
            "    main(['--config', f'configs/experiment/{name}.yaml', '--print-config'])\n")
    out = subprocess.run([sys.executable, "-c", code, *OFFICIAL], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}).stdout
    parts = out.split("=== ")[1:]
    return {part.split("\n", 1)[0]: yaml.safe_load(part.split("\n", 1)[1]) for part in parts}


@pytest.mark.slow  # seconds per case: out of make test-fast
@pytest.mark.parametrize("recipe", OFFICIAL)
def test_recipe_resolves_to_the_official_values(recipe, printed):
    expected = {**SHARED, **OFFICIAL[recipe]}
    got = {key: lookup(printed[recipe], key) for key in expected}
    assert got == expected


def test_training_prompt_is_conv_vicuna_v1_and_evaluation_prompt_conv_llava_v1():
    """R1: --version v1 trains under the "user" line; the official evaluation (model_utils.py:29) asks
    under conv_llava_v1's "human" line, which the evaluate configs that follow it keep."""
    from lightning_modules.config.loading import load_config

    assert LLAVA_V1_SYSTEM == CONV_VICUNA_V1 and "curious human" in LLAVA_V1_EVAL_SYSTEM
    for name in ("vlguard_paper", "suite_paper"):
        cfg = load_config(f"configs/evaluate/{name}.yaml", allow_missing=True)
        assert cfg.evaluate.system_prompt == LLAVA_V1_EVAL_SYSTEM


def test_print_config_shows_the_v1_prompt_and_seed_42(capsys):
    """The issue's acceptance command, through the command's own code path."""
    from lightning_modules.fit import main

    main(["--config", "configs/experiment/vlguard_npo_full.yaml", "--print-config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed"] == 42 and cfg["data"]["system_prompt"] == CONV_VICUNA_V1


def test_print_config_of_a_config_with_mandatory_values_shows_them(capsys):
    """Item 5: `???` values are printed, not an error; what resolves is resolved."""
    from lightning_modules.evaluate import main

    main(["--config", "configs/evaluate/suite_tiny.yaml", "--print-config"])
    out = capsys.readouterr().out
    assert out.startswith("# mandatory values still to set (???): evaluate.benchmarks.")
    cfg = yaml.safe_load(out)
    assert cfg["evaluate"]["benchmarks"]["vlguard_test"] == "???"
    assert cfg["evaluate"]["tasks"][0]["path"] == "${evaluate.benchmarks.vlguard_test}"
    assert cfg["run_dir"] == "runs/eval/suite_tiny"  # an interpolation that resolves is resolved
