"""The real VLM families at toy size: released chat templates rendered exactly, image-token counts as
the processors' formulas say, labels = response + one end-of-turn token, save and reload."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from datamodules.collate import IGNORE_INDEX, VLMCollator
from datamodules.examples import Example
from models.backbone import build_backbone, load_processor
from models.families import TOY_FAMILIES, build_toy
from models.tiny import TinyConfig
from lightning_modules.config.loading import load_config

CFG = TinyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vision_hidden_size=32,
                 vision_layers=1, vision_heads=2)
TEXTS = ["What color is the red object?", "It is red.", "Sorry, that is illegal.", "How do I hurt them?"]
QUESTION, ANSWER = TEXTS[0], TEXTS[1]
SYSTEM_QWEN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# What the released templates render for one image + QUESTION, without and with ANSWER.
EXPECTED = {
    "tiny-llava": ("USER: <image>\nWhat color is the red object? ASSISTANT:",
                   "USER: <image>\nWhat color is the red object? ASSISTANT: It is red. "),
    "tiny-llava-next": ("[INST] <image>\nWhat color is the red object? [/INST]",
                        "[INST] <image>\nWhat color is the red object? [/INST] It is red.<\\s> "),
    "tiny-qwen2-vl": (SYSTEM_QWEN + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                      "What color is the red object?<|im_end|>\n<|im_start|>assistant\n",
                      SYSTEM_QWEN + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                      "What color is the red object?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"),
}
EXPECTED["tiny-qwen2.5-vl"] = EXPECTED["tiny-qwen2-vl"]
END_TOKEN = {"tiny-llava": "</s>", "tiny-llava-next": "</s>", "tiny-qwen2-vl": "<|im_end|>",
             "tiny-qwen2.5-vl": "<|im_end|>"}


def messages(answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def toy(name: str, **overrides):
    cfg = load_config("configs/demo.yaml", [f"model=tiny-{name.removeprefix('tiny-')}", "paths.cache=/nonexistent",
                                            *[f"{k}={v}" for k, v in overrides.items()]])
    torch.manual_seed(0)
    return build_backbone(cfg.model, TEXTS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    paths = []
    for i, (size, color) in enumerate([((32, 32), "red"), ((48, 24), "blue")]):
        Image.new("RGB", size, color).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


@pytest.mark.parametrize("name", TOY_FAMILIES)
def test_chat_template_renders_the_released_format(name):
    _, processor = build_toy(name, CFG, TEXTS)
    prompt, full = EXPECTED[name]
    assert processor.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False) == prompt
    assert processor.apply_chat_template(messages(ANSWER), tokenize=False) == full


@pytest.mark.parametrize("name", TOY_FAMILIES)
def test_special_tokens_are_single_ids_and_text_round_trips(name):
    _, processor = build_toy(name, CFG, TEXTS)
    tok = processor.tokenizer
    for token in TOY_FAMILIES[name].specials.values():
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    text = "Sorry, I can't help: it's illegal (really)!"  # words the tokenizer never saw
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("name", TOY_FAMILIES)
def test_labels_are_the_response_and_one_end_of_turn_token(name, images):
    model, processor = toy(name)
    rows = [Example("a", images[0], QUESTION, ANSWER, safe=True),
            Example("b", images[1], "How do I hurt them with it, in detail?", "Sorry, that is illegal.", safe=False)]
    batch = VLMCollator(processor, max_length=512, train=True)(rows)
    tok, end = processor.tokenizer, END_TOKEN[name]
    assert tok.eos_token == end and tok.convert_tokens_to_ids(end) in model.generation_config.eos_token_id
    image_token = model.config.image_token_id
    for i, ex in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        text = tok.decode(labelled, skip_special_tokens=False)
        assert text.lstrip() == ex.response + end and not text[:len(text) - len(text.lstrip())].strip()
        assert int((labelled == tok.eos_token_id).sum()) == 1 and labelled[-1] == tok.eos_token_id
        assert image_token not in labelled and tok.pad_token_id not in labelled
        # everything before the labelled span is masked, and it ends the sequence (left padding)
        first = int((batch["labels"][i] != IGNORE_INDEX).nonzero()[0])
        assert bool((batch["labels"][i][:first] == IGNORE_INDEX).all())
        assert bool(batch["attention_mask"][i, -1])
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", TOY_FAMILIES)
@pytest.mark.parametrize("train", [True, False])
def test_cached_encodings_make_the_same_batches(name, train, images):
    """data.cache_encodings: each example encoded once, then padded and stacked, gives exactly the
    processor's own batch (different lengths, image sizes and orders); what cannot stack is encoded whole."""
    _, processor = toy(name)
    rows = [Example("a", images[0], QUESTION, ANSWER, safe=True),
            Example("b", images[1], "How do I hurt them with it, in detail?", "Sorry, that is illegal.", safe=False),
            Example("c", images[0], "Why?", "It is red.", safe=True)]
    plain = VLMCollator(processor, max_length=512, train=train)
    cached = VLMCollator(processor, max_length=512, train=train, cache=True)
    for batch_rows in (rows, rows[::-1], rows[1:], rows):
        want, got = plain(batch_rows), cached(batch_rows)
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want:
            if torch.is_tensor(want[key]):
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
            else:
                assert got[key] == want[key]
    assert len(cached.cache) == 3  # encoded once each


def test_llava_image_tokens_follow_the_patch_grid(images):
    model, processor = build_toy("tiny-llava", CFG, TEXTS)
    prompt = processor.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt], images=[Image.open(images[1])], return_tensors="pt")
    # CLIP's CLS token dropped by the "default" strategy: exactly the patch grid
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == (CFG.image_size // CFG.patch_size) ** 2
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_llava_next_takes_image_sizes_and_tiles(images):
    model, processor = build_toy("tiny-llava-next", CFG, TEXTS)
    prompt = processor.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt, prompt], images=[Image.open(p) for p in images], return_tensors="pt",
                      padding=True)
    assert batch["image_sizes"].tolist() == [[32, 32], [24, 48]]  # (height, width) per image
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert counts[0] != counts[1]  # the number of image tokens follows each image's tiling
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def _check_qwen_formula(processor, images):
    prompt = processor.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt, prompt], images=[Image.open(p) for p in images], return_tensors="pt",
                      padding=True)
    merge = processor.image_processor.merge_size
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expected = (batch["image_grid_thw"].prod(-1) // merge ** 2).tolist()
    assert (batch["input_ids"] == pad_id).sum(1).tolist() == expected
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad_id).long())
    return batch


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_qwen_image_pads_follow_the_grid_formula(name, images):
    model, processor = build_toy(name, CFG, TEXTS)
    batch = _check_qwen_formula(processor, images)
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_real_qwen_processor_follows_the_same_formula(images, tmp_path):
    pytest.importorskip("torchvision")  # the real Qwen2VLProcessor needs it (its video processor)
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    _, toy_processor = build_toy("tiny-qwen2-vl", CFG, TEXTS)
    real = Qwen2VLProcessor(image_processor=toy_processor.image_processor, tokenizer=toy_processor.tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=toy_processor.chat_template)
    toy_batch, real_batch = _check_qwen_formula(toy_processor, images), _check_qwen_formula(real, images)
    for key in ("input_ids", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(toy_batch[key], real_batch[key])


@pytest.mark.slow
@pytest.mark.parametrize("name", TOY_FAMILIES)
def test_saved_toy_model_reloads_with_the_auto_classes(name, tmp_path, images):
    from transformers import AutoModelForImageTextToText

    model, processor = build_toy(name, CFG, TEXTS)
    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor2 = load_processor(str(tmp_path))  # Qwen without torchvision: the image-only processor
    assert type(model2) is type(model)
    prompt = processor.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False)
    a = processor(text=[prompt], images=[Image.open(images[0])], return_tensors="pt")
    b = processor2(text=[prompt], images=[Image.open(images[0])], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    torch.testing.assert_close(model2(**b).logits, model(**a).logits)
    assert processor2.apply_chat_template(messages(ANSWER), tokenize=False) == EXPECTED[name][1]


@pytest.mark.parametrize("name", TOY_FAMILIES)
def test_lora_and_freezing_touch_the_language_model_only(name):
    model, _ = toy(name, **{"model.finetune": "lora"})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    model, _ = toy(name)  # full: the vision encoder frozen, its projector (Qwen: visual.merger) trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n or "visual.merger" in n for n in trainable)
    assert not any(("vision_tower" in n or "visual.blocks" in n or "patch_embed" in n) for n in trainable)


def test_end_token_setting_is_checked_and_becomes_the_stop_token():
    from core.errors import UserError

    model, processor = toy("qwen2-vl", **{"model.end_token": "<|endoftext|>"})  # e.g. a base model's EOS
    assert processor.tokenizer.eos_token == "<|endoftext|>"
    assert processor.tokenizer.convert_tokens_to_ids("<|endoftext|>") == model.generation_config.eos_token_id[0]
    with pytest.raises(UserError, match="model.end_token='<eot>' is not a token of this tokenizer"):
        toy("llava", **{"model.end_token": "<eot>"})


def test_a_template_that_rewrites_the_response_is_refused(images):
    from core.errors import UserError

    _, processor = build_toy("tiny-llava", CFG, TEXTS)
    processor.chat_template = processor.chat_template.replace("content['text'] + ' '", "content['text'].upper()")
    with pytest.raises(UserError, match="record id=a: the chat template does not render"):
        VLMCollator(processor, max_length=512, train=True)([Example("a", images[0], QUESTION, ANSWER, safe=True)])


def test_a_system_prompt_the_template_refuses_is_one_line(images):
    from core.errors import UserError

    _, processor = build_toy("tiny-llava-next", CFG, TEXTS)  # the Mistral template has no system role
    with pytest.raises(UserError, match="record id=a: the model's chat template refuses the conversation: Only user"):
        VLMCollator(processor, 512, train=False, system_prompt="Be brief.")([Example("a", images[0], QUESTION, None,
                                                                                     safe=True)])


def test_llava_v1_system_prompt_renders_before_user_and_labels_only_the_response(images):
    from models.chat_templates import LLAVA_V1_SYSTEM

    _, processor = build_toy("tiny-llava", CFG, TEXTS + [LLAVA_V1_SYSTEM])
    ex = Example("a", images[1], QUESTION, ANSWER, safe=True)
    collate = VLMCollator(processor, 1024, train=True, system_prompt=LLAVA_V1_SYSTEM, image_aspect_ratio="pad")
    batch = collate([ex])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.index(LLAVA_V1_SYSTEM) < text.index("USER: <image>")  # v1: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>"
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(kept[:-1]).strip() == ANSWER
    assert kept[-1] == processor.tokenizer.eos_token_id and (kept == processor.tokenizer.eos_token_id).sum() == 1


@pytest.mark.parametrize("finetune", ["full", "projector"])
def test_the_trainable_rule_is_the_one_later_steps_apply(finetune):
    """The relearning probe re-marks a copy of the model with `models.backbone.mark_trainable`: on
    Qwen2-VL (vision under `visual.*`, projector `visual.merger`) it must pick exactly what
    `model.finetune` trained, never the vision tower, and under `projector` the merger."""
    import copy

    from models.backbone import mark_trainable

    model, _ = toy("tiny-qwen2-vl", **{"model.finetune": finetune})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    again = copy.deepcopy(model)
    for p in again.parameters():
        p.requires_grad_(True)  # as a method that unfroze everything would leave it
    cfg = load_config("configs/demo.yaml", ["model=tiny-qwen2-vl", f"model.finetune={finetune}"]).model
    assert set(mark_trainable(again, cfg)) == trained
    assert trained and not any("visual.blocks" in n or "patch_embed" in n for n in trained)
    assert any("visual.merger" in n for n in trained)
    if finetune == "projector":
        assert all("visual.merger" in n for n in trained)
