"""Every YAML file under configs/ is composed and validated by this test: group files onto the demo
config (`group=name`), whole configs (experiments, evaluate suites, demo, debug) on their own."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from core.paths import CONFIG_ROOT
from lightning_modules.config.loading import _compose, load_config
from lightning_modules.config.schema import GROUPS

SHIPPED = sorted(CONFIG_ROOT.rglob("*.yaml"))


def test_the_configs_folder_is_found():
    assert len(SHIPPED) > 30 and (CONFIG_ROOT / "demo.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_shipped_config_composes(path: Path, tmp_path):
    group = path.parent.name
    if path.parent.parent == CONFIG_ROOT and group in GROUPS:
        cfg = load_config(CONFIG_ROOT / "demo.yaml", [f"{group}={path.stem}", f"run_dir={tmp_path}"])
        assert cfg[group] is not None
    else:
        # Keys a config leaves for the user (`???`, e.g. a data directory) get a placeholder path.
        missing = sorted(k for k in OmegaConf.missing_keys(_compose(path.resolve())) if "[" not in k)
        cfg = load_config(path, [f"run_dir={tmp_path}", *(f"{key}={tmp_path}/{key}" for key in missing)])
        assert cfg.method.name and cfg.model.name_or_path
