"""Shared test settings: a small world and a tiny model, so a full fit takes seconds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: tiny models gain nothing from more, and the DDP tests run
# several processes on two cores, where oversubscribed threads slow generation by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Overrides of configs/demo.yaml that keep every stage of the pipeline but shrink it.
SMALL = [
    "data.world.n_base=120", "data.world.n_safety=60", "data.world.n_val=12", "data.world.n_test=12",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64", "model.tiny.vision_hidden_size=32", "model.tiny.vision_heads=2",
    "base.vision_steps=3", "base.steps=3", "base.batch_size=8",
    "data.batch_size=8", "data.eval_batch_size=16", "data.max_eval_samples=10",
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "eval.max_new_tokens=6",
]


@pytest.fixture
def small_overrides(tmp_path_factory) -> list[str]:
    """SMALL plus a cache shared by the session (the world and base are built once) and a fresh run dir."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    run_dir = tmp_path_factory.mktemp("run")
    return SMALL + [f"paths.cache={cache}", f"run_dir={run_dir}"]
