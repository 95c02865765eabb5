"""Shared test settings: a small world and a tiny model, so a full fit takes seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from core.errors import quiet_lightning_tips

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: tiny models gain nothing from more, and the DDP tests run
# several processes on two cores, where oversubscribed threads slow generation by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
quiet_lightning_tips()

ROOT = Path(__file__).resolve().parents[1]


def dotlist(node: dict, prefix: str = "") -> list[str]:
    """A nested mapping as `a.b=value` overrides."""
    out = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += dotlist(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}")
    return out


# Overrides of any run config that keep every stage of the pipeline but shrink it (one file for all tests).
SMALL = dotlist(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "debug" / "small.yaml")))


@pytest.fixture
def small_overrides(tmp_path_factory) -> list[str]:
    """SMALL plus a cache shared by the session (the world and base are built once) and a fresh run dir."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    run_dir = tmp_path_factory.mktemp("run")
    return SMALL + [f"paths.cache={cache}", f"run_dir={run_dir}"]


@pytest.fixture
def one_thread():
    """torch on one thread: on a shared, loaded 2-core machine its 2-thread kernels made tiny
    generation ~100x slower. Files that generate use it for every test (pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_run_dir_between_tests():
    """`run_dirs.prepare_run_dir` exports the chosen run dir for DDP children and locks it. Tests that call
    it directly (or a monkeypatch.delenv of the variable it set, which teardown *restores*) must not
    hand one test's run dir and lock to the next test."""
    from lightning_modules.run import run_dir as run_dirs

    yield
    run_dirs.release_run_dir()
    os.environ.pop(run_dirs.RUN_DIR_ENV, None)
