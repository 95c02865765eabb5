"""RMU on a tiny random LLaVA: the truncated forward gives the full forward's h_ℓ, truncated and
full-forward RMU agree, the reference stays the base model, the control vector is seeded and
travels with the state dict."""

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from datamodules.collate import VLMCollator
from datamodules.examples import Example
from models.backbone import build_backbone
from lightning_modules.config.loading import load_config
from core.errors import UserError
from lightning_modules.methods.rmu import RMUModule
from losses import rmu_retain_loss
from models.backbone import decoder_layers

TEXTS = ["what: which color is the object?", "tell: how do i hurt someone with this item.",
         "the object is red.", "throw it hard at their eyes to hurt them.", "i cannot assist with that request."]


def rmu_module(*overrides: str) -> RMUModule:
    cfg = load_config("configs/experiment/mirage_rmu.yaml", ["paths.cache=/nonexistent", *overrides])
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, TEXTS)
    return RMUModule(model, processor, cfg)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    image = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    module = rmu_module()
    rows = [Example("a", str(image), TEXTS[0], TEXTS[2], safe=True),
            Example("b", str(image), TEXTS[1], TEXTS[3], safe=False)]
    collate = VLMCollator(module.processor, max_length=64, train=True)
    forget, retain = collate(rows[1:] + rows[:1]), collate(rows)
    forget["keys"] = ["b/x", "a/x"]
    return {"forget": forget, "retain": retain}


@pytest.mark.parametrize("layer", [0, 1])
def test_truncated_forward_gives_the_full_forward_hidden_state(batch, layer):
    module = rmu_module(f"method.layer={layer}")
    _, layers = decoder_layers(module.model)
    later_calls, head_rows = [], []
    hooks = [m.register_forward_hook(lambda *a: later_calls.append(1)) for m in layers[layer + 1:]]
    hooks.append(module.model.lm_head.register_forward_hook(lambda m, a, out: head_rows.append(out.shape[1])))
    h = module.hidden_at_layer(batch["forget"])
    for hook in hooks:
        hook.remove()
    assert later_calls == []  # no layer after ℓ ran
    assert head_rows == [1]  # the forward ended normally, with one position's logits (no full-vocab logits)
    assert len(decoder_layers(module.model)[1]) == 3  # the layer list is whole again
    full = module.model(**{k: batch["forget"][k] for k in ("input_ids", "attention_mask", "pixel_values")},
                        output_hidden_states=True)
    assert_close(h, full.hidden_states[layer + 1])  # hidden_states[0] is the embeddings


def test_truncated_and_full_forward_rmu_give_the_same_loss_and_gradients(batch):
    grads = []
    for truncate in ("true", "false"):
        module = rmu_module(f"method.truncate={truncate}")
        with torch.no_grad():  # move the policy off the reference so the retain term is not zero
            for p in module.model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        terms = module.loss_terms(batch)
        terms["loss"].backward()
        grads.append((terms, [p.grad.clone() for p in module.model.parameters() if p.requires_grad]))
    (t1, g1), (t2, g2) = grads
    for key in ("loss", "forget_mse", "retain_mse", "retain_ce"):
        assert_close(t1[key], t2[key])
    assert t1["retain_mse"] > 0
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_reference_is_the_base_model_under_full_fine_tuning(batch):
    module = rmu_module()
    base_h = module.hidden_at_layer(batch["retain"]).detach()
    assert module.reference_mode == "snapshot"
    assert float(module.loss_terms(batch)["retain_mse"]) == 0.0  # policy = reference at init
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert not torch.allclose(module.hidden_at_layer(batch["retain"]), base_h)
    assert_close(module.hidden_at_layer(batch["retain"], reference=True), base_h)


def test_module_swap_reference_and_cut_forward_give_the_numbers_of_the_functional_call_path(batch):
    """The reference that swaps frozen module copies in, with the layer list cut after ℓ, gives the
    h_ℓ that `torch.func.functional_call` over the initial trainable tensors and a forward stopped
    by an exception at layer ℓ gave before (one process): same loss terms."""
    from torch.func import functional_call

    module = rmu_module()
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    retain = batch["retain"]
    store = {}
    handles = [module.layer_module.register_forward_hook(lambda m, a, out: store.update(h=out[0] if isinstance(
        out, tuple) else out)), module.layer_module.register_forward_hook(stop)]
    try:
        functional_call(module.model, initial, args=(), kwargs={k: retain[k] for k in (
            "input_ids", "attention_mask", "pixel_values")})
    except Stop:
        pass
    for handle in handles:
        handle.remove()
    assert_close(module.hidden_at_layer(retain, reference=True), store["h"], rtol=0, atol=0)
    terms = module.loss_terms(batch)
    assert float(terms["retain_mse"]) > 0
    old_path = rmu_retain_loss(module.hidden_at_layer(retain), store["h"], module.position_mask(retain))
    assert_close(terms["retain_mse"], old_path)


def test_reference_is_the_adapter_disabled_model_under_lora(batch):
    module = rmu_module("model.finetune=lora")
    base_h = module.hidden_at_layer(batch["retain"]).detach()
    assert module.reference_mode == "adapter"
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.add_(0.1)
    assert not torch.allclose(module.hidden_at_layer(batch["retain"]), base_h)
    assert_close(module.hidden_at_layer(batch["retain"], reference=True), base_h)


def test_control_vector_is_seeded_scaled_and_in_the_state_dict():
    a, b, c = rmu_module("seed=1"), rmu_module("seed=1"), rmu_module("seed=2", "method.steering_coeff=3.0")
    assert_close(a.control_vector, b.control_vector)
    assert a.control_vector.norm().item() == pytest.approx(10.0)
    assert c.control_vector.norm().item() == pytest.approx(3.0)
    assert not torch.allclose(a.control_vector / 10, c.control_vector / 3)
    c.load_state_dict(a.state_dict())  # a resume restores u, whatever the new run's seed
    assert_close(c.control_vector, a.control_vector)


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_text_positions_exclude_padding_and_image_tokens(batch):
    module = rmu_module()
    retain = batch["retain"]
    image_tokens = (retain["input_ids"] == module.model.config.image_token_id) & retain["attention_mask"].bool()
    assert image_tokens.any()
    mask = module.position_mask(retain)
    assert int(mask.sum()) == int(retain["attention_mask"].sum() - image_tokens.sum())
    assert rmu_module("method.positions=all").position_mask(retain) is None


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_bad_rmu_settings_fail_in_one_line():
    with pytest.raises(UserError, match=r"method.layer=3: the model has 3 decoder layers"):
        rmu_module("method.layer=3")
    with pytest.raises(UserError, match=r"method.train_layers=\[2\]: layers must lie in 0..1"):
        rmu_module("method.train_layers=[2]")
    with pytest.raises(UserError, match="RMU trains nothing"):
        rmu_module("method.param_pattern=nothing_matches")
    with pytest.raises(UserError, match="unknown method.reference 'cache'"):
        rmu_module("method.reference=cache")


def test_auto_layer_follows_depth_as_the_official_recipe():
    from lightning_modules.methods.rmu import auto_layer

    assert [auto_layer(n) for n in (32, 40, 28, 36, 3, 2, 1)] == [7, 9, 6, 8, 1, 0, 0]


def auto_rmu_module(*overrides: str) -> RMUModule:
    cfg = load_config("configs/demo.yaml", ["paths.cache=/nonexistent", "method=rmu", *overrides])
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, TEXTS)
    return RMUModule(model, processor, cfg)


def _trained_layers(module) -> set[int]:
    return {int(n.split(f"{module.layers_name}.")[1].split(".")[0]) for n in module.trained_parameters
            if f"{module.layers_name}." in n}


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_layer_auto_reproduces_the_tuned_tiny_layer_and_follows_the_model_config():
    module = auto_rmu_module()  # the 3-layer Mirage World model
    assert module.params.layer == "auto" and module.layer_index == 1 and module.train_layers == [0, 1]
    assert _trained_layers(module) == {0, 1}
    deep = auto_rmu_module("model.tiny.num_layers=9")  # round(7/32 x 9) = 2
    assert deep.layer_index == 2 and deep.train_layers == [0, 1, 2]
    pinned = auto_rmu_module("model.tiny.num_layers=9", "model.rmu_layer=5")
    assert pinned.layer_index == 5 and _trained_layers(pinned) == {3, 4, 5}
    assert auto_rmu_module("model.rmu_layer=5", "method.layer=0").layer_index == 0  # explicit ℓ wins


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_train_projector_adds_the_projector_or_says_why_it_cannot():
    module = auto_rmu_module("method.train_projector=true")
    projector = [n for n in module.trained_parameters if "multi_modal_projector" in n]
    assert projector and all(module.model.get_parameter(n).requires_grad for n in projector)
    assert not [n for n in auto_rmu_module().trained_parameters if "multi_modal_projector" in n]
    with pytest.raises(UserError, match="train_projector=true but no projector parameter is trainable"):
        auto_rmu_module("method.train_projector=true", "model.finetune=lora")
    lora = auto_rmu_module("method.train_projector=true", "model.finetune=lora",
                           "model.lora.modules_to_save=[multi_modal_projector]")
    assert any("multi_modal_projector" in n for n in lora.trained_parameters)


def test_rmu_on_qwen2_vl_uses_the_language_layers_and_the_merger():
    module = auto_rmu_module("model=tiny-qwen2-vl", "model.tiny.num_layers=5", "method.train_projector=true")
    assert module.layers_name.endswith("language_model.layers") and module.layer_index == 1
    assert any("visual.merger" in n for n in module.trained_parameters)
    assert not any("visual.blocks" in n for n in module.trained_parameters)


def test_alpha_zero_is_forget_mse_plus_lambda_ce_without_a_reference_forward(batch, monkeypatch):
    # The official LoRA recipe (α 0, λ 1.2): no retain activation term, so the reference is never run.
    module = rmu_module("method.alpha=0", "method.retain_weight=1.2", "method.positions=all")
    monkeypatch.setattr(module, "reference_forward", lambda *a, **k: pytest.fail("reference forward with α = 0"))
    terms = module.loss_terms(batch)
    assert "retain_mse" not in terms
    assert_close(terms["loss"], terms["forget_mse"] + 1.2 * terms["retain_ce"])


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_ddp_with_tensors_trained_after_layer_l_and_no_full_forward_is_refused_before_a_step():
    """λ = 0 and truncated forwards: LoRA tensors after ℓ (train_layers=all) would never get a gradient,
    which DDP refuses mid-run; refused at setup instead, unless DDP is told to expect it."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    settings = ("model.finetune=lora", "method.train_layers=all", "method.layer=0", "method.alpha=0")
    module = rmu_module(*settings, "method.retain_weight=0")
    module._trainer = SimpleNamespace(strategy=DDPStrategy())
    with pytest.raises(UserError, match=r"method.retain_weight=0 with method.truncate=true leaves .*layers\.[12]\..* "
                                        r"trained after layer 0 without a gradient, which DDP refuses; allowed: "):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    module.setup("fit")
    for ok in (rmu_module(*settings, "method.retain_weight=1"), rmu_module(*settings, "method.retain_weight=0",
                                                                          "method.truncate=false")):
        ok._trainer = SimpleNamespace(strategy=DDPStrategy())
        ok.setup("fit")
