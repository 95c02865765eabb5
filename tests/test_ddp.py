"""Exact metrics under DDP: the same eval sets on 1, 2 and 3 CPU processes (gloo) give identical
counts, every sample is counted once (no padding repeats), and the results rank 0 writes
(results.json, samples.jsonl) hold every rank's samples.

7 queries per eval set: not divisible by 2 or 3, so ranks hold uneven shards and run different
numbers of eval batches (batch size 1) -- a collective inside the eval step would hang, hence the
timeout. Weights must be equal across runs for equal generations: the random tiny model is first
trained a little in-process (so that it refuses some queries and not others), then every run starts
from it and takes two training steps with lr=0 (gradients are all-reduced, nothing moves).
DDP re-runs sys.argv for each rank, so every run is a subprocess of the CLI.
"""

from __future__ import annotations

import json
import time
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.safety import ShardSampler, is_padding
from lightning_modules.config.loading import load_config
from lightning_modules.run.assembly import build_run
from lightning_modules.run.fsdp import FSDP2Strategy
from test_bad_inputs import REPO, cli_env
from vlguard_fixture import vlguard_overrides, write_vlguard

N_EVAL = 7
EVAL_SETS = ("unsafe_clean", "unsafe_attacked", "safe_clean", "safe_rewritten")


def start_model(files: dict, out: Path) -> Path:
    """The random tiny model after 4 SFT steps, saved like the fit CLI saves `model/`."""
    cfg = load_config(REPO / "configs" / "demo.yaml", vlguard_overrides(files, out.parent / "start_run"))
    L.seed_everything(cfg.seed)  # as the fit CLI does: the same random init whatever ran before in this process
    module, data = build_run(cfg)
    L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              use_distributed_sampler=False).fit(module, data)
    module.model.save_pretrained(out)
    module.processor.save_pretrained(out)
    return out


def run(files: dict, run_dir: Path, devices: int, model: Path) -> Path:
    trainer = ["trainer.accelerator=cpu", f"trainer.devices={devices}"]
    if devices > 1:
        trainer.append("trainer.strategy=ddp")
    args = [sys.executable, "-m", "lightning_modules.fit", "--config", "configs/demo.yaml",
            *vlguard_overrides(files, run_dir), f"model.name_or_path={model}", *trainer, "trainer.max_steps=2",
            "optim.lr=0", f"data.max_eval_samples={N_EVAL}", "eval.max_new_tokens=6", "eval.val_at_start=true",
            "eval.judge=keyword"]  # every non-refused unsafe answer counts: ASR is not all zero either
    proc = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def counts(run_dir: Path) -> dict[str, tuple]:
    """(n, refused, harmful) per eval set from results.json (rates x n are integer counts)."""
    results = json.loads((run_dir / "results.json").read_text())
    return {name: (int(r["n"]), round(r["refusal_rate"] * r["n"]), round(r["asr"] * r["n"]))
            for name, r in results.items()}


def samples(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return sorted((r["subset"], r["id"], r["response"], r["refusal"], r["harmful"]) for r in rows)


def val_at_start(run_dir: Path) -> dict[str, float]:
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]
            if tag.startswith("val/") and tag.endswith(("refusal_rate", "asr", "ir"))}


@pytest.mark.slow
@pytest.mark.scale  # 2 and 3 processes against 1: minutes, in make test-scale
def test_counts_are_identical_on_1_2_and_3_processes(tmp_path):
    files = write_vlguard(tmp_path / "data", n_val=N_EVAL, n_test=N_EVAL)
    start = start_model(files, tmp_path / "start")
    runs = {k: run(files, tmp_path / f"devices{k}", k, start) for k in (1, 2, 3)}

    reference = counts(runs[1])
    assert set(reference) == set(EVAL_SETS)
    assert all(n == N_EVAL for n, _, _ in reference.values())
    # Not a trivial comparison: the random tiny model refuses some queries and not others.
    assert 0 < sum(r for _, r, _ in reference.values()) < 4 * N_EVAL
    assert 0 < sum(h for _, _, h in reference.values()) < 2 * N_EVAL
    for k in (2, 3):
        assert counts(runs[k]) == reference, f"{k} processes"

    # samples.jsonl (gathered from all ranks by rank 0): every query exactly once, same outputs.
    rows = samples(runs[1])
    assert Counter(subset for subset, *_ in rows) == {name: N_EVAL for name in EVAL_SETS}
    assert len(set(rows)) == len(rows)
    for name, (n, refused, harmful) in reference.items():
        assert sum(r[3] for r in rows if r[0] == name) == refused
        assert sum(r[4] for r in rows if r[0] == name) == harmful
    for k in (2, 3):
        assert samples(runs[k]) == rows, f"{k} processes"
        # validation (step 0) is synced the same way
        assert val_at_start(runs[k]) == val_at_start(runs[1])

    # Runs on different process counts stay comparable: scale is logged with the hyperparameters.
    for k, run_dir in runs.items():
        scale = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())["scale"]
        assert scale["world_size"] == k and scale["effective_batch_size"] == 4 * k
        events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # TensorBoard's HParams tab


def test_fsdp_strategy_shards_the_transformer_blocks_from_config():
    """FSDP is FSDP2 (ModelParallelStrategy + fully_shard); its construction from config is checked
    here, its runs in tests/test_strategies.py."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from core.errors import UserError
    from core.distributed import shards_parameters
    from lightning_modules.run.fsdp import transformer_block_classes
    from lightning_modules.run.strategies import build_strategy
    from models.tiny import TinyConfig, build_tiny_model, train_tokenizer

    model = build_tiny_model(train_tokenizer(["a b c"]), TinyConfig(hidden_size=32, intermediate_size=64,
                                                                    vision_hidden_size=32, num_heads=2, vision_heads=2))
    assert transformer_block_classes(model) == {LlamaDecoderLayer, CLIPEncoderLayer}
    strategy = build_strategy({"name": "fsdp", "sharding_strategy": "SHARD_GRAD_OP", "activation_checkpointing": True,
                               "state_dict_type": "sharded", "timeout": 60}, model)
    assert isinstance(strategy, FSDP2Strategy) and shards_parameters(strategy)
    assert strategy.blocks == {LlamaDecoderLayer, CLIPEncoderLayer} and strategy.activation_checkpointing
    assert not strategy.reshard_after_forward and strategy._save_distributed_checkpoint
    assert strategy._timeout.total_seconds() == 60
    default = build_strategy("fsdp", model)  # the plain name is FSDP2 too, never Lightning's FSDP1
    assert isinstance(default, FSDP2Strategy) and default.reshard_after_forward
    assert not default._save_distributed_checkpoint  # full: rank 0 writes one file through the checkpoint IO
    assert build_strategy("ddp") == "ddp" and not shards_parameters(object())
    with pytest.raises(UserError, match="unknown config key 'trainer.strategy.shard'"):
        build_strategy({"name": "fsdp", "shard": "FULL"}, model)


def test_shard_sampler_pads_only_when_asked():
    shards = [ShardSampler(7, rank, 3).indices for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    padded = [ShardSampler(7, rank, 3, pad=True).indices for rank in range(3)]
    assert padded == [[0, 3, 6], [1, 4, 7], [2, 5, 7]]  # 7 = the padding row past the end


def test_sharded_eval_runs_equal_batches_and_counts_no_padding(tmp_path):
    """Under FSDP / ZeRO-3 every rank must run the same number of eval batches: short shards get a
    padding row, which is generated but never counted (no GPU here: a rank of a 3-process FSDP run
    is simulated by giving the datamodule that trainer)."""
    files = write_vlguard(tmp_path / "data", n_val=N_EVAL, n_test=N_EVAL)
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      vlguard_overrides(files, tmp_path / "run") + [f"data.max_eval_samples={N_EVAL}"])
    module, data = build_run(cfg)
    data.setup("validate")
    data.trainer = SimpleNamespace(global_rank=2, world_size=3, strategy=FSDP2Strategy(set()))
    loaders = data.val_dataloader()
    for loader in loaders:
        rows = [ex for batch in loader for ex in batch["examples"]]
        assert len(rows) == 3 and [is_padding(ex) for ex in rows] == [False, False, True]
    module.eval()
    for batch in loaders[0]:
        module._eval_step(batch, 0, module.val_metrics, keep=False)
    assert int(module.val_metrics["unsafe_clean"].compute()["n"]) == 2  # rows 2 and 5 of 7; the padding row is not counted


# -- a fault on one rank ----------------------------------------------------------------------------
FAILING_RANK = '''"""fit, with rank 1 failing in its first training step (every DDP rank re-runs this script)."""
import os, sys, time
sys.path.insert(0, {repo!r})
from lightning_modules.methods.sft import SFTModule

real = SFTModule.training_step

def failing(self, batch, batch_idx):
    if self.global_rank == 1:
        time.sleep(float(os.environ.get("HANG_S", "0")))  # a hung rank, for a while
        raise RuntimeError("boom on the second rank")
    return real(self, batch, batch_idx)

SFTModule.training_step = failing
from lightning_modules.fit import main
main()
'''


def start_failing_run(tmp_path: Path, *extra: str, hang_s: float = 0) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(repo=str(REPO)))
    files = write_vlguard(tmp_path / "data")
    args = [sys.executable, str(script), "--config", "configs/demo.yaml", *vlguard_overrides(files, tmp_path / "run"),
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2", "eval.val_at_start=false", *extra]
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(args, cwd=REPO, env=dict(cli_env(), HANG_S=str(hang_s)), stdout=subprocess.DEVNULL,
                                stderr=err)
    return proc, stderr


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.scale
def test_an_error_on_one_rank_is_one_line_naming_it_and_the_others_stop(tmp_path):
    proc, stderr = start_failing_run(tmp_path, "trainer.strategy=ddp")
    assert proc.wait(timeout=240) == 1
    text = stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert error_lines(text) == ["error: rank 1: RuntimeError: boom on the second rank (--debug shows the traceback)"]
    assert "rank 0 stopped: rank 1 exited with status 1" in text  # not hanging in the all-reduce
    assert not (tmp_path / "run" / "results.csv").exists()


@pytest.mark.slow
@pytest.mark.scale
def test_a_hung_rank_is_left_after_the_collective_timeout(tmp_path):
    """Rank 1 hangs for 60 s in its first step: rank 0 waits 20 s in the gradient all-reduce
    (trainer.strategy.timeout; it also bounds the start-up rendezvous, hence not less), then stops
    with a line of its own and kills rank 1 (5 s grace): no rank outlives the run."""
    from rank_kills import alive

    proc, stderr = start_failing_run(tmp_path, "trainer.strategy={name: ddp, timeout: 20}", hang_s=60)
    assert proc.wait(timeout=240) == 1
    text = stderr.read_text()
    assert "rank 0 stopped: another rank failed or stopped answering" in text, text[-3000:]
    assert not error_lines(text)  # rank 1 never woke to say anything
    deadline = time.monotonic() + 10
    while alive(str(tmp_path / "run")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(str(tmp_path / "run"))


def test_the_collective_timeout_is_seconds():
    from datetime import timedelta

    from core.errors import UserError
    from lightning_modules.run.strategies import build_strategy

    assert build_strategy({"name": "ddp", "timeout": 90})._timeout == timedelta(seconds=90)
    with pytest.raises(UserError, match=r"'trainer.strategy.timeout': 'soon' \(allowed: a number of seconds > 0\)"):
        build_strategy({"name": "ddp", "timeout": "soon"})
