"""The second fidelity pass over the training recipes (R1-R9 of the official code's behaviour): each
test fails on the behaviour the package had before. The recipes' values themselves are checked in
test_official_recipes.py / test_sft_recipes.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from core.errors import UserError
from datamodules.collate import IGNORE_INDEX, VLMCollator
from datamodules.examples import Example, safe_record_conversations, vlguard_examples
from datamodules.forget_retain import ForgetRetainDataModule, PairCollator, PairSampler
from datamodules.safety import SafetyDataModule, resolve_data_files
from lightning_modules.config.loading import load_config
from lightning_modules.config.schema import DataSettings
from models.backbone import build_backbone, build_tiny
from models.tiny import TinyConfig
from vlguard_fixture import prepared_vlguard

TEXTS = ["what: which color is the object?", "tell: how do i hurt someone with this item.",
         "the object is red.", "throw it hard at their eyes to hurt them.", "i cannot assist with that request."]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_vlguard(tmp_path_factory.mktemp("fidelity"))


def _data_cfg(prepared: Path, **values):
    cfg = OmegaConf.structured(DataSettings(kind="vlguard", root=str(prepared), image_mode="none"))
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _unsafes_and_safes(*paths: Path) -> tuple[int, int]:
    recs = [r for p in paths for r in json.loads(p.read_text())]
    return sum(not r["safe"] for r in recs), sum(r["safe"] for r in recs)


# -- R2: the whole training file --------------------------------------------------------------------
@pytest.mark.parametrize("whole", [False, True])
def test_forget_and_retain_come_from_the_whole_training_file(prepared, whole):
    cfg = _data_cfg(prepared, whole_train_file=whole, **{"forget_retain.forget_halves": "unsafes"})
    data = ForgetRetainDataModule(cfg, resolve_data_files(cfg), processor=None)
    forget, retain = data.forget_candidates(), data.retain_examples()
    files = [prepared / "train.json"] + ([prepared / "val.json"] if whole else [])
    unsafes, safes = _unsafes_and_safes(*files)
    assert (len(forget), len(retain)) == (unsafes, safes)
    assert _unsafes_and_safes(prepared / "train.json", prepared / "val.json") == (20, 20)  # the raw file's 40


def test_sft_rows_come_from_the_whole_training_file(prepared):
    cfg = _data_cfg(prepared, whole_train_file=True)
    rows = SafetyDataModule(cfg, resolve_data_files(cfg), processor=None).train_dataset()
    assert len(rows) == 60  # 40 records: 20 unsafe (1 row) + 20 safe (2 rows)


def test_build_forget_retain_reads_the_whole_file_when_asked(prepared, tmp_path):
    from datamodules import vlguard

    train, retain = vlguard.whole_train_files(vlguard.read_manifest(prepared)["files"], tmp_path / "out")
    assert _unsafes_and_safes(train) == (20, 20) and _unsafes_and_safes(retain) == (0, 20)
    assert all(Path(ex.image).is_file() for ex in vlguard_examples(train))  # image paths still resolve


# -- item 2: validation never sees the test split ---------------------------------------------------
def test_a_validation_file_sharing_test_queries_is_refused(tmp_path):
    folder = prepared_vlguard(tmp_path)
    leaky = folder / "leaky_val.json"  # the test file's records under another name
    leaky.write_text((folder / "test.json").read_text())
    cfg = _data_cfg(folder, val_file=str(leaky))
    with pytest.raises(UserError, match="shares 18 queries with the test file"):
        SafetyDataModule(cfg, resolve_data_files(cfg), processor=None).check_val_apart_from_test()
    ok = SafetyDataModule(_data_cfg(folder), resolve_data_files(_data_cfg(folder)), processor=None)
    ok.check_val_apart_from_test()  # the prepared split is apart from the test file


# -- R4: VLGuard's safe image as one two-turn conversation -------------------------------------------
def test_a_safe_record_is_one_shuffled_two_turn_conversation(prepared):
    rows = vlguard_examples(prepared / "train.json")
    convs = safe_record_conversations(rows)
    safe_records = [r for r in json.loads((prepared / "train.json").read_text()) if r["safe"]]
    assert len(convs) == len(rows) - len(safe_records)
    two_turn = [c for c in convs if c.follow_ups]
    assert len(two_turn) == len(safe_records)
    orders = {tuple(c.extra["conversation"]) for c in two_turn}
    assert orders == {("safe_safes", "safe_unsafes"), ("safe_unsafes", "safe_safes")}  # shuffled, both orders
    assert [c.id for c in safe_record_conversations(rows)] == [c.id for c in convs]  # seeded


def test_the_conversation_trains_both_answers(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    rec = {"id": "s1", "image": "a.png", "safe": True, "instr-resp": [
        {"safe_instruction": TEXTS[0], "response": TEXTS[2]}, {"unsafe_instruction": TEXTS[1], "response": TEXTS[4]}]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    _, processor = build_tiny(TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                         vision_hidden_size=32, vision_heads=2), TEXTS)
    (conv,) = safe_record_conversations(vlguard_examples(tmp_path / "d.json"))
    batch = VLMCollator(processor, max_length=256, train=True)([conv])
    labelled = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert TEXTS[2] in labelled and TEXTS[4] in labelled and TEXTS[0] not in labelled


# -- R7: truncation after image expansion --------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img")
    Image.new("RGB", (32, 32), "red").save(folder / "a.png")
    _, processor = build_tiny(TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                         vision_hidden_size=32, vision_heads=2), TEXTS)
    long = Example("long", str(folder / "a.png"), TEXTS[0], " ".join([TEXTS[3]] * 8), safe=False)
    short = Example("short", str(folder / "a.png"), TEXTS[0], TEXTS[2], safe=True)
    return processor, long, short


def test_an_overlong_row_is_truncated_with_its_labels_image_kept(toy):
    processor, long, short = toy
    full = VLMCollator(processor, max_length=4096, train=True)([long, short])
    n_long = int(full["attention_mask"][0].sum())
    limit = n_long - 7
    with pytest.raises(UserError, match="more than data.max_length"):  # the project's default: refuse
        VLMCollator(processor, max_length=limit, train=True)([long, short])
    cut = VLMCollator(processor, max_length=limit, train=True, overlong="truncate")([long, short])
    assert cut["input_ids"].shape[1] == limit and int(cut["attention_mask"][0].sum()) == limit
    width = full["input_ids"].shape[1]
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, width - n_long: width - n_long + limit])
    assert torch.equal(cut["labels"][0], full["labels"][0, width - n_long: width - n_long + limit])
    image_id = processor.image_token_id
    assert int((cut["input_ids"][0] == image_id).sum()) == int((full["input_ids"][0] == image_id).sum())
    n_short = int(full["attention_mask"][1].sum())  # the short row is untouched, left-padded again
    assert torch.equal(cut["input_ids"][1, -n_short:], full["input_ids"][1, -n_short:])
    assert int(cut["attention_mask"][1].sum()) == n_short


def test_a_cut_through_the_image_tokens_is_refused(toy):
    processor, long, _ = toy
    with pytest.raises(UserError, match="would split its image tokens"):
        VLMCollator(processor, max_length=3, train=True, overlong="truncate")([long])


# -- R8: an independent retain draw for CE(D_r) ------------------------------------------------------
def test_the_ce_retain_batch_is_an_independent_draw_and_leaves_the_pairs_as_they_were():
    plain = list(PairSampler(5, 12, seed=3, epoch_over="retain"))
    triples = list(PairSampler(5, 12, seed=3, epoch_over="retain", separate_retain_ce=True))
    assert [t[:2] for t in triples] == plain
    assert sorted(t[2] for t in triples) == list(range(12))  # a permutation of the retain set
    assert [t[2] for t in triples] != [t[1] for t in triples]


def _npo(*overrides):
    from lightning_modules.methods.npo import NPOModule

    cfg = load_config("configs/experiment/mirage_npo.yaml", ["paths.cache=/nonexistent", *overrides])
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, TEXTS)
    return NPOModule(model, processor, cfg)


def test_retain_ce_is_taken_on_the_separate_draw(toy):
    module = _npo("method.reference=snapshot", "method.retain_npo_alpha=1.0", "method.retain_weight=1.0")
    folder = Path(toy[1].image).parent
    rows = [Example(str(i), str(folder / "a.png"), TEXTS[i % 2], TEXTS[2 + i % 3], safe=True) for i in range(4)]
    collate = PairCollator(VLMCollator(module.processor, max_length=128, train=True))
    batch = collate([(rows[0], rows[1], rows[2]), (rows[1], rows[0], rows[3])])
    terms = module.loss_terms(batch)
    assert torch.allclose(terms["retain_ce"], module.ce(batch["retain_ce_batch"]))
    assert not torch.allclose(terms["retain_ce"], module.ce(batch["retain"]))


# -- R3: the official RMU run updates during the first epoch only --------------------------------------
def _rmu_fit(toy, iterator: str, epochs: int = 3):
    from lightning_modules.methods.rmu import RMUModule

    cfg = load_config("configs/experiment/mirage_rmu.yaml", ["paths.cache=/nonexistent", f"trainer.max_epochs={epochs}",
                                                             f"method.retain_iterator={iterator}", "optim.lr=1e-3",
                                                             "optim.warmup_ratio=0"])
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, TEXTS)
    module = RMUModule(model, processor, cfg)
    folder = Path(toy[1].image).parent
    rows = [Example(str(i), str(folder / "a.png"), TEXTS[i % 2], TEXTS[2 + i % 3], safe=i % 2 == 0) for i in range(4)]
    collate = PairCollator(VLMCollator(processor, max_length=128, train=True))
    batches = [collate([(rows[1], rows[0])]), collate([(rows[3], rows[2])])]
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


@pytest.mark.slow
def test_rmu_retain_iterator_once_stops_after_epoch_one_under_the_whole_schedule(toy):
    once, restart = _rmu_fit(toy, "once"), _rmu_fit(toy, "restart")
    assert (once.global_step, restart.global_step) == (2, 6)
    lr = once.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    assert math.isclose(lr, 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))  # step 2 of a 6-step cosine


def test_retain_iterator_once_needs_a_retain_term():
    from lightning_modules.methods.rmu import RMUModule

    cfg = load_config("configs/experiment/mirage_rmu.yaml", ["paths.cache=/nonexistent", "method.retain_iterator=once",
                                                             "method.alpha=0"])
    model, processor = build_backbone(cfg.model, TEXTS)
    with pytest.raises(UserError, match="method.retain_iterator='once'.*method.alpha > 0"):
        RMUModule(model, processor, cfg)


# -- R4: the projector's own learning rate -----------------------------------------------------------------
def test_projector_lr_puts_the_projector_in_a_group_of_its_own():
    from lightning_modules.methods.param_groups import group_lr, param_groups

    cfg = load_config("configs/experiment/mirage_sft.yaml", ["paths.cache=/nonexistent", "optim.lr=2e-4",
                                                             "optim.projector_lr=2e-5"])
    model, _ = build_backbone(cfg.model, TEXTS)
    groups = param_groups(model, cfg.optim)
    projector = {id(p) for n, p in model.named_parameters() if "multi_modal_projector" in n}
    assert {id(p) for p in groups[-1]["params"]} == projector and groups[-1]["lr"] == 2e-5
    assert not projector & {id(p) for p in groups[0]["params"]} and "lr" not in groups[0]
    assert [group_lr(g, cfg.optim) for g in groups] == [2e-4, 2e-5]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-5]
    OmegaConf.update(cfg, "optim.projector_lr", None)
    assert len(param_groups(model, cfg.optim)) == 1


# -- R6: the selection judge decodes as the checkpoint says ----------------------------------------------
def test_the_judge_samples_as_the_checkpoint_generation_config_says(tmp_path):
    from tiny_lm import CHAT_TEMPLATE, JUDGE_TEXTS, save_tiny_lm
    from transformers import GenerationConfig

    from core.generation import greedy_generate
    from datamodules import official_pipeline as official
    from models.chat_judge import ChatJudge

    path = save_tiny_lm(tmp_path / "judge", JUDGE_TEXTS, CHAT_TEMPLATE)
    GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0).save_pretrained(path)  # Llama-2-chat-like
    conv = official.judge_conversation("x.png", ["one", "two"])
    judge = ChatJudge.from_pretrained(str(path), dtype="float32", max_new_tokens=12)
    greedy = ChatJudge.from_pretrained(str(path), dtype="float32", max_new_tokens=12, decoding="greedy")
    torch.manual_seed(0)
    sampled = [judge(conv) for _ in range(4)]
    torch.manual_seed(0)
    assert [judge(conv) for _ in range(4)] == sampled  # seeded: reproducible
    text = judge.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    batch = judge.tokenizer([text], return_tensors="pt", add_special_tokens=False)
    assert greedy(conv) == greedy_generate(greedy.model, greedy.tokenizer, batch, 12)[0]
    assert len(set(sampled)) > 1  # the official default samples; greedy never varies
    with pytest.raises(UserError, match="judge decoding 'beam'"):
        ChatJudge(judge.model, judge.tokenizer, decoding="beam")


# -- R9: the reference NLL cache under the training step's autocast -------------------------------------
def test_the_reference_nll_cache_is_computed_under_the_training_autocast(toy):
    from losses import sequence_nll

    module = _npo("method.reference=cache")
    folder = Path(toy[1].image).parent
    rows = [Example(str(i), str(folder / "a.png"), TEXTS[1], TEXTS[3], safe=False) for i in range(2)]
    from datamodules.forget_retain import KeyedCollator

    batch = KeyedCollator(VLMCollator(module.processor, max_length=128, train=True))(rows)
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    cache = module.compute_reference_nll([batch])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under = sequence_nll(module.forward_model(batch).logits, batch["labels"])[0].tolist()
    with torch.no_grad():
        plain = sequence_nll(module.forward_model(batch).logits, batch["labels"])[0].tolist()
    assert [cache[k] for k in batch["keys"]] == under and under != plain


# -- R5: what the NPO full recipe claims ----------------------------------------------------------------
def test_the_npo_full_label_says_what_is_known_and_what_is_not():
    recipe = Path("configs/experiment/vlguard_npo_full.yaml").read_text()
    doc = Path("docs/vlguard.md").read_text()
    for text in (recipe, doc):
        assert "run_eval_each_model.sh:28-43" in text and "README:92" in text
    assert "Table 1, NPO row" not in doc and "ASSUMED" in recipe


def test_projector_lr_without_a_trainable_projector_is_one_line():
    from lightning_modules.methods.param_groups import param_groups

    cfg = load_config("configs/experiment/mirage_sft.yaml", ["paths.cache=/nonexistent", "optim.projector_lr=2e-5"])
    model, _ = build_backbone(cfg.model, TEXTS)
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" not in name)
    with pytest.raises(UserError, match=r"optim.projector_lr=2e-05 but no projector parameter trains"):
        param_groups(model, cfg.optim)


def test_readme_stays_a_front_page():
    assert len(Path("README.md").read_bytes()) <= 16 * 1024
