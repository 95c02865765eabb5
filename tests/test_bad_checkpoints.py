"""Bad checkpoints and resumes that cannot continue exactly, each refused in one line before anything is
written: planted pickles in every checkpoint kind the project loads (the code never runs: its marker
file is never created), another base under a trainable-only checkpoint, another world size or
strategy, a divergence before any checkpoint."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from test_bad_inputs import EARLIER, REPO, _fit_args, _evaluate_args, invoke, snapshot
from vlguard_fixture import vlguard_overrides, write_vlguard

MARKER = "code-ran"


class Planted:
    """Unpickled by a loader that runs code, it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _planted_ckpt(d: Path):
    torch.save({"state_dict": {}, "global_step": 1, "callbacks": Planted(d / MARKER)}, d / "planted.ckpt")


def _deepspeed_dir(d: Path):
    """DeepSpeed's layout (`latest` + tag directory) with a model-states file that would run code."""
    (d / "ds" / "checkpoint").mkdir(parents=True)
    (d / "ds" / "latest").write_text("checkpoint")
    torch.save({"module": {"w": torch.zeros(2)}, "ds_version": "0.19.8"},
               d / "ds" / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {"w": torch.zeros(2)}, "buffer_names": Planted(d / MARKER)},
               d / "ds" / "checkpoint" / "mp_rank_00_model_states.pt")


def _dcp_dir(item):
    """A torch.distributed.checkpoint directory saved by DCP itself; `item` is one of its values."""
    def apply(d: Path):
        import torch.distributed.checkpoint as dcp

        dcp.save({"model.w": torch.zeros(2), "step": item(d)}, checkpoint_id=str(d / "dcp"), no_dist=True)
    return apply


def _dcp_metadata_planted(d: Path):
    import pickle

    _dcp_dir(lambda _: 3)(d)

    (d / "dcp" / ".metadata").write_bytes(pickle.dumps(Planted(d / MARKER)))


def _lightning_meta_planted(d: Path):
    _dcp_dir(lambda _: 3)(d)
    torch.save({"global_step": 1, "loops": Planted(d / MARKER)}, d / "dcp" / "meta.pt")


def _sharded_for(world_size: int, strategy: str):
    def apply(d: Path):
        import json

        _dcp_dir(lambda _: 3)(d)
        (d / "dcp" / "run_identity.json").write_text(json.dumps({"world_size": world_size, "strategy": strategy}))
    return apply


def _trained_on_another_base(d: Path):
    torch.save({"state_dict": {}, "global_step": 1, "run_identity": {
        "name_or_path": "llava-hf/llava-1.5-7b-hf", "revision": "a272c74", "trainable_only": True,
        "base_digest": "0" * 64}}, d / "lora.ckpt")


def _written_by(world_size: int, strategy: str):
    """A whole, fitting checkpoint of this very model, written under another layout."""
    def apply(d: Path):
        import lightning as L

        from lightning_modules.config.loading import load_config
        from lightning_modules.run.assembly import build_run

        files = {f"data.{s}_file": str(d / f"{s}.json") for s in ("train", "val", "test")}
        cfg = load_config(REPO / "configs/demo.yaml", vlguard_overrides(files, d.parent / "run"))
        L.seed_everything(cfg.seed)
        module, _ = build_run(cfg)
        torch.save({"state_dict": module.state_dict(), "global_step": 1, "hyper_parameters": dict(module.hparams),
                    "run_identity": {"world_size": world_size, "strategy": strategy, "trainable_only": False}},
                   d / "other_layout.ckpt")
    return apply


def _nothing(d: Path):
    pass


SLOW = pytest.mark.slow
# (case id, how to break the fixture, extra arguments, text the error line must name)
FIT = [
    ("resume_planted_pickle_ckpt", _planted_ckpt, ["resume={data}/planted.ckpt"],
     "cannot load resume checkpoint {data}/planted.ckpt with weights_only=True"),
    ("resume_planted_pickle_deepspeed", _deepspeed_dir, ["resume={data}/ds"],
     "resume checkpoint {data}/ds: mp_rank_00_model_states.pt is refused, it is not plain checkpoint data and "
     "loading it could run code"),
    ("resume_planted_pickle_dcp_item", _dcp_dir(lambda d: Planted(d / MARKER)), ["resume={data}/dcp"],
     "resume checkpoint {data}/dcp: .metadata is refused, it is not plain checkpoint data"),
    ("resume_planted_pickle_dcp_metadata", _dcp_metadata_planted, ["resume={data}/dcp"],
     "resume checkpoint {data}/dcp: .metadata is refused, it is not plain checkpoint data and loading it could "
     "run code (global 'pathlib.Path.touch' is not checkpoint data)"),
    ("resume_planted_pickle_lightning_meta", _lightning_meta_planted, ["resume={data}/dcp"],
     "resume checkpoint {data}/dcp: meta.pt is refused, it is not plain checkpoint data"),
    ("resume_sharded_other_world_size", _sharded_for(8, "ModelParallelStrategy"), ["resume={data}/dcp"],
     "resume checkpoint {data}/dcp is sharded for 8 process(es) under ModelParallelStrategy; this run has 1 under "
     "SingleDeviceStrategy"),
    ("resume_trainable_only_other_base", _trained_on_another_base, ["resume={data}/lora.ckpt"],
     "resume checkpoint {data}/lora.ckpt holds only the trained tensors of base llava-hf/llava-1.5-7b-hf@a272c74 "
     "(weights 000000000000), but this run's base is"),
    pytest.param("resume_other_world_size", _written_by(2, "DDPStrategy"), ["resume={data}/other_layout.ckpt"],
                 "resume checkpoint {data}/other_layout.ckpt was written by 2 process(es) under DDPStrategy; this run "
                 "has 1 under SingleDeviceStrategy", marks=SLOW),
    pytest.param("resume_other_strategy", _written_by(1, "DeepSpeedStrategy"), ["resume={data}/other_layout.ckpt"],
                 "was written by 1 process(es) under DeepSpeedStrategy; this run has 1 under SingleDeviceStrategy: "
                 "set trainer.devices / trainer.num_nodes / trainer.strategy back", marks=SLOW),
    pytest.param("diverged_before_any_checkpoint", _nothing,
                 ["optim.lr=1e30", "trainer.max_steps=4", "checkpoint.every_n_train_steps=100"],
                 "; training stopped; no checkpoint was written before it (lower optim.lr and start again)", marks=SLOW),
]
EVALUATE = [
    ("evaluate_planted_pickle_ckpt", _planted_ckpt, ["evaluate.checkpoint={data}/planted.ckpt"],
     "cannot load checkpoint {data}/planted.ckpt with weights_only=True"),
    ("evaluate_missing_ckpt", _nothing, ["evaluate.checkpoint={data}/nope.ckpt"], "checkpoint not found: {data}/nope.ckpt"),
]
FRESH_RUN_DIR = ("diverged_before_any_checkpoint", "resume_sharded_other_world_size")  # no step to compare with
CASES = [pytest.param("fit", *c.values, marks=c.marks, id=c.values[0]) if hasattr(c, "values")
         else pytest.param("fit", *c, id=c[0]) for c in FIT] + [pytest.param("evaluate", *c, id=c[0]) for c in EVALUATE]


@pytest.mark.parametrize("command, name, corrupt, extra, expected", CASES)
def test_bad_checkpoint_fails_in_one_line(command, name, corrupt, extra, expected, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("SAFETY_MIRAGE_RUN_DIR", raising=False)
    monkeypatch.chdir(REPO)
    data, run_dir = tmp_path / "data", tmp_path / "run"
    files = write_vlguard(data)
    (data / "attacks").mkdir()
    for attack in ("test_what_3shot.json", "test_share_1shot.json"):
        (data / "attacks" / attack).write_bytes((data / "test.json").read_bytes())
    if name not in FRESH_RUN_DIR:  # a finished run already lives in the run dir: it must stay as it was
        for rel, content in EARLIER.items():
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / rel).write_bytes(content)
    corrupt(data)
    before = snapshot(run_dir) if run_dir.exists() else {}
    extra = [e.replace("{data}", str(data)).replace("{run}", str(run_dir)) for e in extra]
    if command == "fit":
        from lightning_modules.fit import main

        status, stderr = invoke(main, _fit_args(data, run_dir, files, extra), capfd)
    else:
        from lightning_modules.evaluate import main

        status, stderr = invoke(main, _evaluate_args(data, run_dir, extra), capfd)
    assert status == 2, f"exit {status}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert expected.replace("{data}", str(data)).replace("{run}", str(run_dir)) in errors[0], errors[0]
    assert not (data / MARKER).exists()  # no code from a checkpoint ever ran
    if name.startswith("diverged"):
        assert "checkpoint kept" not in errors[0]
    else:  # refused before anything in the run directory was rewritten
        assert snapshot(run_dir) == before


def test_the_table_has_its_cases():
    assert len(CASES) >= 11


def test_a_converted_original_checkpoint_never_runs_code(tmp_path):
    """models.convert_llava reads original-format .bin files as data only."""
    from core.errors import UserError
    from models.convert_llava import load_weights

    torch.save({"model.mm_projector.0.weight": torch.zeros(2), "x": Planted(tmp_path / MARKER)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin: cannot be read as a state dict \(UnpicklingError\)"):
        load_weights(tmp_path)
    assert not (tmp_path / MARKER).exists()


def test_a_clean_sharded_checkpoint_passes_the_check(tmp_path):
    """The check refuses only what is not data: DCP's own metadata and items, DeepSpeed's own classes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    from core.checkpoints import check_sharded_checkpoint

    _dcp_dir(lambda _: {"epoch": 3, "names": ["a"]})(tmp_path)
    torch.save({"global_step": 1, "loops": {"fit_loop": {}}}, tmp_path / "dcp" / "meta.pt")
    check_sharded_checkpoint(tmp_path / "dcp")
    ds = tmp_path / "ds" / "checkpoint"
    ds.mkdir(parents=True)
    torch.save({"loss_scaler": DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=1,
                                                 consecutive_hysteresis=False, raise_error_at_min_scale=True,
                                                 dtype=torch.bfloat16),
                "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}]},
               ds / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_sharded_checkpoint(tmp_path / "ds")


def test_deepspeeds_own_loader_reads_checkpoint_files_as_data(tmp_path):
    """Past resume's check, DeepSpeed's engine reads each file through its checkpoint engine, whose
    TorchCheckpointEngine passes weights_only=False: AtomicDeepSpeedStrategy.load_checkpoint swaps in a
    data-only load, so a planted pickle is refused there too (the engine is a stand-in that reads as
    DeepSpeedEngine.load_checkpoint does; tests/test_deepspeed_cpu.py resumes real ones through it)."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from lightning.pytorch.trainer.states import TrainerFn

    from core.errors import UserError
    from lightning_modules.run.checkpointing import AtomicDeepSpeedStrategy

    _deepspeed_dir(tmp_path)
    files = tmp_path / "ds" / "checkpoint"

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

        def load_checkpoint(self, load_dir, **_):
            states = self.checkpoint_engine.load(str(files / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "cpu")
            return load_dir, {**self.checkpoint_engine.load(str(files / "mp_rank_00_model_states.pt"), "cpu"), **states}

    strategy = AtomicDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}})
    strategy.model = Engine()
    strategy._lightning_module = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING)),
                                                 strict_loading=True)
    with pytest.raises(UserError, match=f"resume checkpoint {tmp_path / 'ds'}: mp_rank_00_model_states.pt is "
                                        "refused, it is not plain checkpoint data and loading it could run code"):
        strategy.load_checkpoint(tmp_path / "ds")
    assert not (tmp_path / MARKER).exists()
    torch.save({"module": {"w": torch.zeros(2)}}, files / "mp_rank_00_model_states.pt")  # clean: loads
    assert strategy.load_checkpoint(tmp_path / "ds")["ds_version"] == "0.19.8"
