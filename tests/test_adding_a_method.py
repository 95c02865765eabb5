"""docs/adding-a-method.md, executed: its loss, its subclass, its registry line and its YAML define a
method that the config schema accepts, compare lists and fit trains."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from core.errors import UserError
from lightning_modules import methods
from lightning_modules.config import loading

from conftest import SMALL

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "adding-a-method.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture
def guide_method(monkeypatch, tmp_path):
    """The guide's python blocks run in one namespace (the registry line edits a copy of METHODS),
    its YAML written to a copy of configs/ that config loading reads."""
    namespace = {"METHODS": dict(methods.METHODS)}
    for code in blocks("python"):
        exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 -- our own documentation
    monkeypatch.setattr(methods, "METHODS", namespace["METHODS"])
    (yaml,) = blocks("yaml")
    name = OmegaConf.create(yaml).name
    configs = tmp_path / "configs"
    shutil.copytree(loading.CONFIG_ROOT, configs)
    (configs / "method" / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    monkeypatch.setattr(loading, "CONFIG_ROOT", configs)
    return name, namespace, configs


def test_the_guide_defines_a_checked_method(guide_method, tmp_path):
    name, namespace, configs = guide_method
    assert name not in ("sft", "ga", "graddiff", "npo", "simnpo", "rmu") and name in methods.METHODS
    cfg = loading.load_config(configs / "demo.yaml", [f"method={name}", f"run_dir={tmp_path}"])
    params = methods.get_method(name).parse_params(cfg.method)
    loss = namespace["capped_ga_loss"](torch.tensor(7.0, requires_grad=True), params.cap)
    assert float(loss.detach()) == -params.cap  # past the cap: ascent stops
    loss.backward()
    with pytest.raises(UserError, match=f"method.cap"):  # the guide's range is enforced
        loading.load_config(configs / "demo.yaml", [f"method={name}", "method.cap=0"])


@pytest.mark.slow
def test_the_guide_method_trains(guide_method, small_overrides):
    from lightning_modules.run import training

    name, _, configs = guide_method
    cfg = loading.load_config(configs / "demo.yaml", [*small_overrides, f"method={name}", "trainer.max_steps=2",
                                                       "eval.val_at_start=false"])
    table = training.run(cfg)
    assert table is not None and {"unsafe_clean", "safe_clean"} <= set(table.index)
