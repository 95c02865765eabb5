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


@pytest.mark.parametrize("family", ["mirage", "vlguard"])
def test_a_method_experiment_is_its_family_file_plus_the_method(family, tmp_path):
    """compare runs a registered method without an experiment file of its own as the family file plus
    method=<name>: each shipped <family>_<method>.yaml differs from that only where its body says so."""
    from lightning_modules.config.diff import changed_keys, flatten
    from lightning_modules.methods import METHODS

    extra = [f"run_dir={tmp_path}"]
    for method in METHODS:
        own_path = CONFIG_ROOT / "experiment" / f"{family}_{method}.yaml"
        own = load_config(own_path, extra)
        derived = load_config(CONFIG_ROOT / "experiment" / f"{family}.yaml", [f"method={method}", *extra])
        body = OmegaConf.load(own_path)
        written = set(flatten({k: v for k, v in OmegaConf.to_container(body).items() if k != "defaults"}))
        assert set(changed_keys(flatten(own), flatten(derived))) <= written, method
