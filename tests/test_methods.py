"""The unlearning methods on a small Mirage World: each fits, moves its forget loss the right way
and keeps the retain loss finite; NPO's reference modes agree; the reference cache survives a
resume; a divergence stops the run and leaves the last good checkpoint; every method logs the
same val/ tags as SFT."""

import math
import os

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_modules import fit
from metrics.gaps import GAPS
from lightning_modules.config.loading import load_config
from lightning_modules.run.run_dir import RUN_DIR_ENV
from lightning_modules.run.assembly import build_run
from lightning_modules.run.training import run
from lightning_modules.methods.ga import GAModule
from datamodules.forget_retain import example_key
from lightning_modules.methods.npo import NPOModule
from losses import make_control_vector

from conftest import SMALL

pytestmark = pytest.mark.slow  # every test here trains, generates or spawns

# The shared small settings, with the demo's tiny sizes (3 decoder layers, hidden 96: RMU's layer
# choices and control vector are checked against them) and a base trained a little longer.
OVERRIDES = [*SMALL, "model.tiny.hidden_size=96", "model.tiny.num_layers=3", "model.tiny.num_heads=4",
             "model.tiny.intermediate_size=256", "model.tiny.vision_hidden_size=64", "model.tiny.vision_heads=4",
             "data.world.n_base=200", "data.world.n_safety=40", "data.world.n_val=8", "data.world.n_test=8",
             "base.vision_steps=5", "base.steps=10", "data.batch_size=4", "data.max_eval_samples=4",
             "eval.max_new_tokens=4"]
UNLEARNING = ("ga", "graddiff", "npo", "simnpo", "rmu")


def config(method: str, cache, *extra: str):
    return load_config(f"configs/experiment/mirage_{method}.yaml", [f"paths.cache={cache}", *OVERRIDES, *extra])


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A small world and its tiny base, built once (every method starts from this base)."""
    path = tmp_path_factory.mktemp("cache")
    build_run(config("sft", path))
    return path


@pytest.fixture
def fresh_run_dir(monkeypatch):
    # fit.run pins the run dir in the environment for DDP ranks: each test run gets its own.
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    yield lambda: monkeypatch.delenv(RUN_DIR_ENV, raising=False)


def quiet_trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, use_distributed_sampler=False)


@torch.no_grad()
def forget_and_retain(module, batch) -> tuple[float, float]:
    """(the quantity the method pushes on the forget batch, retain CE). NLL methods raise the
    forget CE; RMU lowers the distance of h_ℓ to c·u."""
    if module.name == "rmu":
        forget = float(module.loss_terms(batch)["forget_mse"])
    else:
        forget = float(module.ce(batch["forget"]))
    return forget, float(module.ce(batch["retain"]))


@pytest.mark.parametrize("method", UNLEARNING)
def test_method_moves_forget_loss_and_keeps_retain_finite(method, cache):
    L.seed_everything(0)
    # SimNPO's push fades as σ(-β·nll/len): the barely trained test base already has ~3.5 nats per
    # token on the forget responses, where β = 2.5 leaves a weight of 2e-4 and β = 0.5 one of 0.15.
    extra = ["method.beta=0.5", "optim.lr=1e-2"] if method == "simnpo" else []
    module, data = build_run(config(method, cache, "optim.lr=3e-3", "optim.warmup_ratio=0", *extra))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    forget_before, retain_before = forget_and_retain(module, batch)
    quiet_trainer(6).fit(module, data)
    forget_after, retain_after = forget_and_retain(module, batch)
    # the batch and its evaluation are fixed: any move is the training's
    if method == "rmu":
        assert forget_after < 0.98 * forget_before
    else:
        assert forget_after > forget_before + 0.05
    assert math.isfinite(retain_before) and math.isfinite(retain_after)


def test_only_the_selected_rmu_parameters_train(cache):
    module, _ = build_run(config("rmu", cache, "method.layer=2"))
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trained == [f"model.language_model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)]
    module, _ = build_run(config("rmu", cache, "method.layer=1", "method.train_layers=[1]",
                                 "method.extra_params=multi_modal_projector"))
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert "model.language_model.layers.1.mlp.down_proj.weight" in trained
    assert all("down_proj" in n and ".1." in n or "multi_modal_projector" in n for n in trained)


def test_rmu_under_lora_trains_only_adapters_of_the_selected_layers(cache):
    module, _ = build_run(config("rmu", cache, "model.finetune=lora"))
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "down_proj" in n and (".0." in n or ".1." in n) for n in trained)
    assert module.reference_mode == "adapter"


def test_npo_reference_modes_agree_with_2_over_beta_log2_at_init(cache):
    expected = 2 / 0.1 * math.log(2)
    for extra in (["method.reference=cache"], ["method.reference=snapshot"], ["model.finetune=lora"],
                  ["model.finetune=lora", "method.reference=adapter"]):
        L.seed_everything(0)
        module, data = build_run(config("npo", cache, *extra))
        data.setup("fit")
        if module.reference_mode == "cache":
            module.reference_nll = module.compute_reference_nll(data.forget_dataloader())
            assert len(module.reference_nll) == len(data.forget)
        batch = next(iter(data.train_dataloader()))
        with torch.no_grad():
            terms = module.loss_terms(batch)
        assert terms["npo"].item() == pytest.approx(expected, abs=1e-3), extra


def test_npo_retain_term_at_init_is_minus_2_over_beta_log2_with_a_cached_or_adapter_reference(cache):
    # The official retain term α·(2/β)·logσ(β(CE_r − CE_r,ref)): at θ = ref it is −(2/β)·log 2, with
    # the retain reference NLL cached (full FT) or read with the adapter off (LoRA).
    beta = 0.9
    for extra in (["method.reference=cache"], ["model.finetune=lora", "method.reference=adapter"]):
        module, data = build_run(config("npo", cache, f"method.beta={beta}", "method.normalization=batch_mean_ce",
                                        "method.retain_npo_alpha=1.0", *extra))
        data.setup("fit")
        if module.reference_mode == "cache":
            module.reference_nll = module.compute_reference_nll(data.forget_dataloader())
            module.retain_reference_nll = module.compute_reference_nll(data.retain_dataloader())
            assert len(module.retain_reference_nll) == len({k for k in map(example_key, data.retain)})
        batch = next(iter(data.train_dataloader()))
        with torch.no_grad():
            terms = module.loss_terms(batch)
        assert terms["retain_npo"].item() == pytest.approx(-2 / beta * math.log(2), abs=1e-3), extra
        expected = terms["npo"] + terms["retain_npo"] + terms["retain_ce"]
        assert terms["loss"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_npo_auto_reference_is_the_nll_cache_under_lora_too(cache):
    # The cache costs ~1.0x an SFT step; the adapter-off reference ~1.2-1.4x (a second forward each step).
    module, _ = build_run(config("npo", cache, "model.finetune=lora"))
    assert module.reference_mode == "cache"
    module, _ = build_run(config("npo", cache, "model.finetune=lora", "method.reference=adapter"))
    assert module.reference_mode == "adapter"


def test_npo_reference_cache_is_checkpointed_and_not_recomputed_on_resume(cache, tmp_path, monkeypatch,
                                                                          fresh_run_dir):
    common = [f"run_dir={tmp_path / 'run'}", "eval.val_at_start=false", "eval.test_at_end=false",
              "trainer.limit_val_batches=0"]
    run(config("npo", cache, *common, "trainer.max_steps=2"))
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2 and len(first["reference_nll"]) > 0

    def recompute(self, loader):
        raise AssertionError("the reference NLL was recomputed against a moved policy")

    monkeypatch.setattr(NPOModule, "compute_reference_nll", recompute)
    fresh_run_dir()
    run(config("npo", cache, *common, "trainer.max_steps=4", "resume=last"))
    second = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 4 and second["reference_nll"] == first["reference_nll"]


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(cache, tmp_path, monkeypatch,
                                                                          capsys, fresh_run_dir):
    original = GAModule.loss_terms

    def poisoned(self, batch):  # GA diverging at step 3
        terms = original(self, batch)
        if self.global_step == 3:
            terms = {**terms, "loss": terms["loss"] * float("inf"), "forget_ce": terms["forget_ce"] * float("nan")}
        return terms

    monkeypatch.setattr(GAModule, "loss_terms", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        fit.main(["--config", "configs/experiment/mirage_ga.yaml", f"paths.cache={cache}", *OVERRIDES,
                  f"run_dir={run_dir}", "checkpoint.every_n_train_steps=1", "trainer.max_steps=10",
                  "eval.val_at_start=false", "trainer.limit_val_batches=0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: non-finite loss at step 3 in term(s) loss, forget_ce")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # The weights after 3 updates are the ones whose loss was non-finite: the checkpoint kept is the
    # last one whose next loss was finite (after 2 updates), never one that cannot train.
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "results.csv").exists()


@pytest.mark.parametrize("method", ("sft", *UNLEARNING))
def test_every_method_fits_from_the_base_and_logs_the_sft_val_tags(method, cache, tmp_path, fresh_run_dir):
    table = run(config(method, cache, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2",
                       "trainer.val_check_interval=1", "trainer.log_every_n_steps=1"))
    unsafe_sets = ("unsafe_clean", "unsafe_attacked", "unsafe_neutral", "unsafe_cue_removed")
    safe_sets = ("safe_clean", "safe_rewritten", "safe_neutral")
    assert set(table.index) == {*unsafe_sets, *safe_sets}
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    val_tags = {t for t in events.Tags()["scalars"] if t.startswith("val/")}
    expected = {f"val/{s}/{k}" for s in unsafe_sets for k in ("refusal_rate", "asr", "ir", "relevant")}
    expected |= {f"val/{s}/{k}" for s in safe_sets for k in ("refusal_rate", "asr", "ir", "accuracy")}
    assert val_tags == expected | {f"val/{g}" for g in GAPS}  # every gap of metrics.gaps, by its one name
    assert len(events.Scalars("val/mirage_gap")) == 3  # step 0, 1, 2
    train_tags = {t for t in events.Tags()["scalars"] if t.startswith("train/")}
    assert "train/loss" in train_tags and (method == "sft" or train_tags & {"train/forget_ce", "train/forget_mse"})
    assert os.path.isfile(tmp_path / "run" / "model" / "config.json")
    if method == "rmu":  # u travels with the checkpoint: a resume steers towards the same vector
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
        torch.testing.assert_close(ckpt["state_dict"]["control_vector"], make_control_vector(96, 10.0, seed=0))
