"""`fit --plan`: the run plan from the config alone (LLaVA-1.5-7B on the meta device from its shipped
config.json, offline) and on every toy family; the memory estimate and the accumulation by hand."""

from __future__ import annotations

import pytest

from core.errors import UserError
from lightning_modules.config.loading import load_config
from lightning_modules.run.assembly import accumulation_steps
from lightning_modules.run.plan import plan_model, run_plan
from models.families import TOY_FAMILIES
from models.memory import GiB, ModelShape, estimate_memory


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# recipe -> (trainable parameters in millions, a trained tensor group, the reference)
LLAVA_7B = {
    "vlguard_rmu_full": (156.25, "model.language_model.layers.{5-7}.mlp.down_proj.weight", "reference: snapshot"),
    "vlguard_npo_full": (6759.92, "model.language_model.embed_tokens.weight", "reference: cache"),
    "vlguard_npo_lora": (340.80, "layers.{0-31}.self_attn.q_proj.lora_A.default.weight", "reference: cache"),
    "vlguard_rmu_lora": (340.80, "layers.{0-31}.self_attn.q_proj.lora_A.default.weight",
                         "reference: adapter, never run: method.alpha=0"),
}


@pytest.mark.slow  # seconds per case: out of make test-fast
@pytest.mark.parametrize("recipe", LLAVA_7B)
def test_plan_of_llava_7b_from_its_shipped_config_without_weights(recipe):
    cfg = load_config(f"configs/experiment/{recipe}.yaml")
    assert next(plan_model(cfg).parameters()).device.type == "meta"  # no weight is loaded
    plan = run_plan(cfg)
    trainable, tensor, reference = LLAVA_7B[recipe]
    assert f"parameters: 7,{'063.4' if 'full' in recipe else '404.2'}M, trainable {trainable:,.2f}M" in plan
    assert tensor in plan and reference in plan
    assert "vision tower     trainable       0.00M   frozen     303.51M" in plan
    assert "projector        trainable      20.98M" in plan  # the projector trains in every official recipe
    effective = 8 if "full" in recipe else 64
    assert f"= {effective} effective (data.effective_batch_size={effective})" in plan
    assert "GPU memory estimate per device" in plan and "data: rows: not counted here" in plan


@pytest.mark.parametrize("family", ["tiny", *TOY_FAMILIES])
@pytest.mark.parametrize("method", ["sft", "rmu"])
def test_plan_on_every_toy_family(family, method, small_overrides):
    cfg = load_config(f"configs/experiment/mirage_{method}.yaml", [*small_overrides, f"model={family}"])
    plan = run_plan(cfg)
    assert "steps: " in plan and " per epoch, " in plan and "data: val: unsafe_clean" in plan
    if method == "rmu":
        assert "mlp.down_proj.weight" in plan and "reference: snapshot" in plan
    else:
        assert "reference: none" in plan


def test_plan_without_a_readable_config_is_one_line():
    cfg = load_config("configs/experiment/vlguard_npo_full.yaml", ["model.hf_config=null",
                                                                    "model.name_or_path=nobody/nothing-7b"])
    with pytest.raises(UserError, match="set model.hf_config"):
        run_plan(cfg)


def test_memory_estimate_by_hand():
    # 10 params, 4 trainable, bf16 plain (optim.master_weights=none); 2 layers, h 8, V 16, B 1, T 4.
    shape = ModelShape(total_params=10, trainable_params=4, n_layers=2, hidden=8, vocab=16)
    est = estimate_memory(shape, weight_bytes=2, path="none", seq_len=4, batch=1, checkpointing=False,
                          reference_params=4, fused=False)
    assert [est.value(n) for n in ("weights", "gradients", "AdamW moments", "optimizer-step temporary",
                                   "reference copy")] == [20, 8, 16, 8, 8]
    assert est.value("activations") == 2 * 34 * 4 * 8 + 2 * 4 * 4 * 16
    ckpt = estimate_memory(shape, weight_bytes=2, path="none", seq_len=4, batch=1, checkpointing=True, graphs=2)
    assert ckpt.value("activations") == 2 * ((2 * 2 * 32 + 34 * 32) + 2 * 4 * 4 * 16)
    # fp32 masters: 4 + 2 (compute copy) + 4 + 8 bytes per trainable parameter, frozen ones at 2
    fp32 = estimate_memory(shape, weight_bytes=2, path="fp32", seq_len=4, batch=1, checkpointing=False)
    assert fp32.model_states == 4 * 4 + 6 * 2 + 4 * 2 + 4 * 4 + 4 * 8
    assert est.total == est.model_states + est.activations + est.value("CUDA/NCCL overhead") and GiB == 2 ** 30


def test_accumulation_reaches_the_official_batch_on_fewer_devices():
    assert accumulation_steps(8, 1, 1) == 8 and accumulation_steps(64, 8, 2) == 4 and accumulation_steps(8, 1, 8) == 1
    with pytest.raises(UserError, match="data.effective_batch_size=8 is not a multiple of data.batch_size=1 x 3"):
        accumulation_steps(8, 1, 3)


def test_every_fit_prints_the_same_plan_as_its_first_lines(monkeypatch, capsys, small_overrides):
    from lightning_modules.run import training

    cfg = load_config("configs/demo.yaml", small_overrides)

    def stop(_cfg):  # the plan comes before the run directory is even prepared
        raise RuntimeError("stopped after the plan")

    monkeypatch.setattr(training, "prepare_run_dir", stop)
    with pytest.raises(RuntimeError, match="stopped after the plan"):
        training.run(cfg)
    assert capsys.readouterr().out == run_plan(cfg) + "\n"


def test_plan_steps_follow_the_epoch_definition(small_overrides):
    """epoch_over=retain (the official trainer): an epoch is one pass over the retain set."""
    import re

    steps = {}
    for epoch_over in ("longer", "retain"):
        cfg = load_config("configs/experiment/mirage_npo.yaml", [*small_overrides, "data.batch_size=4",
                                                                 f"data.forget_retain.epoch_over={epoch_over}"])
        plan = run_plan(cfg)
        forget, retain = (int(re.search(rf"data: {side}: (\d+)", plan).group(1)) for side in ("forget", "retain"))
        steps[epoch_over] = int(re.search(r"steps: (\d+) per epoch", plan).group(1))
    assert steps == {"longer": -(-max(forget, retain) // 4), "retain": -(-retain // 4)} and forget != retain


def test_plan_says_when_updates_stop_after_the_first_epoch(small_overrides):
    """method.retain_iterator=once (the official full RMU trainer): the schedule spans max_epochs, the
    updates one epoch."""
    import re

    base = [*small_overrides, "method.alpha=1.0", "trainer.max_steps=-1", "trainer.max_epochs=3"]
    for iterator in ("once", "restart"):
        plan = run_plan(load_config("configs/experiment/mirage_rmu.yaml", [*base, f"method.retain_iterator={iterator}"]))
        per_epoch, total = (int(g) for g in re.search(r"steps: (\d+) per epoch, (\d+) in total", plan).groups())
        assert total == 3 * per_epoch
        said = f"updates: {per_epoch}, epoch 1 only (method.retain_iterator=once); the learning-rate schedule is " \
               f"sized for the {total}"
        assert (said in plan) == (iterator == "once"), plan
