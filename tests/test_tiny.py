import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from models.backbone import apply_finetune_mode, build_tiny
from lightning_modules.config.schema import ModelSettings
from models.tiny import TinyConfig
from omegaconf import OmegaConf

TEXTS = ["what: name the color of the object?", "the object is red.", "i'm sorry, i cannot help with that."]
CFG = TinyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vision_hidden_size=32,
                 vision_heads=2)


def _batch(processor, texts):
    img = Image.new("RGB", (32, 32), (200, 10, 10))
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
        add_generation_prompt=True, tokenize=False) for t in texts]
    return processor(images=[img] * len(texts), text=prompts, return_tensors="pt", padding=True)


def test_tokenizer_round_trips_text_refusal_keywords_survive():
    _, processor = build_tiny(CFG, TEXTS)
    tok = processor.tokenizer
    ids = tok("i'm sorry, i cannot help with that.", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "i'm sorry, i cannot help with that."


def test_image_token_count_matches_vision_patches():
    model, processor = build_tiny(CFG, TEXTS)
    batch = _batch(processor, ["what: name the color of the object?"])
    n_image = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_image == (CFG.image_size // CFG.patch_size) ** 2  # CLS dropped by the "default" strategy
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_save_and_reload_through_auto_classes(tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny(CFG, TEXTS)
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    batch = _batch(processor, TEXTS[:2])
    batch2 = _batch(processor2, TEXTS[:2])
    torch.testing.assert_close(batch2["input_ids"], batch["input_ids"])
    torch.testing.assert_close(model2(**batch2).logits, model(**batch).logits)
    assert processor2.tokenizer.padding_side == "left"


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_modes_select_parameters():
    for mode in ("full", "projector", "lora"):
        model, _ = build_tiny(CFG, TEXTS)
        cfg = OmegaConf.structured(ModelSettings(finetune=mode))
        model = apply_finetune_mode(model, cfg)
        names = _trainable(model)
        assert names and not any("vision_tower" in n for n in names), mode
        if mode == "projector":
            assert all("multi_modal_projector" in n for n in names)
        if mode == "lora":
            assert all("lora_" in n and "language_model" in n for n in names)
