import pytest

from lightning_modules.config.loading import load_config
from core.errors import UserError

DEMO = "configs/demo.yaml"


def test_demo_composes_groups_and_interpolates():
    cfg = load_config(DEMO)
    assert cfg.model.name_or_path == "tiny"
    assert cfg.method.name == "sft"
    assert cfg.data.kind == "mirage_world"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.run_dir == "runs/demo"  # ${name} resolved
    assert cfg.base.cache_dir == ".cache/safety-mirage/bases"  # ${paths.cache} resolved
    assert cfg.model.trust_remote_code is False


def test_dotlist_overrides_and_types():
    cfg = load_config(DEMO, ["optim.lr=0.5", "name=x", "data.world.rho=1.0", "trainer.max_steps=7"])
    assert cfg.optim.lr == 0.5 and cfg.run_dir == "runs/x"
    assert cfg.data.world.rho == 1.0 and cfg.trainer.max_steps == 7


def test_group_override_swaps_whole_group():
    cfg = load_config(DEMO, ["model=llava-1.5-7b"])
    assert cfg.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert cfg.model.finetune == "lora" and cfg.model.lora.r == 128


@pytest.mark.parametrize("override, message", [
    ("data.foo=1", "unknown config key 'data.foo'"),
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("seed=abc", "invalid value for config key 'seed'"),
    ("trainer.max_stepz=3", "unknown config key 'trainer.max_stepz'"),
    ("method=nope", "unknown method config 'nope'"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_give_one_line(override, message):
    with pytest.raises(UserError) as err:
        load_config(DEMO, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)


def test_experiment_can_start_from_another(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults: [demo]\nname: child\noptim: {lr: 0.25}\n")
    cfg = load_config(exp)
    assert cfg.name == "child" and cfg.optim.lr == 0.25 and cfg.method.name == "sft"


def test_the_safety_mirage_command_dispatches_to_each_command(capsys):
    from lightning_modules.__main__ import COMMANDS, main

    main(["fit", "--config", "configs/demo.yaml", "--print-config", "seed=7"])
    assert "seed: 7" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    listing = capsys.readouterr().out
    assert exit_.value.code == 0 and all(name in listing for name in COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2 and "usage: safety-mirage" in capsys.readouterr().err
