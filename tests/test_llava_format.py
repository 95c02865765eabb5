"""LLaVA-format rows read whole (datamodules/llava_format.py) and trained whole (datamodules/conversation.py,
the collator): a multi-turn row's every gpt turn labelled and nothing else, text-only rows, single-turn rows
unchanged, the first exchange for evaluation, one-line errors for malformed turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from core.errors import UserError
from datamodules.collate import IGNORE_INDEX, VLMCollator
from datamodules.conversation import chat_messages
from datamodules.llava_format import llava_examples, to_llava_record, write_llava
from models.backbone import build_tiny
from models.chat_templates import LLAVA_V1_SYSTEM
from models.families import build_toy
from models.tiny import TinyConfig

CFG = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vision_hidden_size=32,
                 vision_layers=1, vision_heads=2)
THREE_TURNS = [("<image>\nWhat is in the picture?", "A red square on a table."),
               ("Why is it red?", "It was painted red."),
               ("How big is it?", "About 32 pixels wide.")]
TEXTS = [t for pair in THREE_TURNS for t in pair] + ["Write a short poem about rain.", "Rain falls softly."]
FAMILIES = ["tiny", "tiny-llava", "tiny-qwen2-vl", "tiny-llava-next"]


@pytest.fixture(scope="module")
def llava_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava")
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    records = [
        {"id": "multi", "image": "red.png",
         "conversations": [{"from": f, "value": v} for pair in THREE_TURNS for f, v in zip(("human", "gpt"), pair)]},
        {"id": "text", "conversations": [{"from": "human", "value": TEXTS[-2]}, {"from": "gpt", "value": TEXTS[-1]}]},
        {"id": "single", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red square."}]},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def processor_of(family: str):
    if family == "tiny":
        return build_tiny(CFG, TEXTS)[1]
    return build_toy(family, CFG, TEXTS)[1]


def labelled_runs(tokenizer, input_ids, labels) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def test_rows_are_read_whole(llava_file, tmp_path):
    multi, text, single = llava_examples(llava_file, safe=True)
    # instruction / response are the first exchange (what evaluation, judges and metrics see)
    assert (multi.instruction, multi.response) == ("What is in the picture?", "A red square on a table.")
    assert multi.follow_ups == tuple(THREE_TURNS[1:]) and multi.image == str(llava_file.parent / "red.png")
    assert text.image is None and text.follow_ups == () and single.follow_ups == ()
    write_llava(tmp_path / "back.json", [to_llava_record(ex) for ex in (multi, text, single)])
    assert llava_examples(tmp_path / "back.json", safe=True) == [multi, text, single]


def test_a_leading_gpt_turn_and_an_unanswered_last_question_are_left_out(tmp_path):
    turns = [("gpt", "Hello."), ("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2"), ("human", "Q3")]
    (tmp_path / "d.json").write_text(json.dumps([{"id": "r", "conversations": [{"from": f, "value": v}
                                                                                for f, v in turns]}]))
    (row,) = llava_examples(tmp_path / "d.json", safe=True)
    assert (row.instruction, row.response, row.follow_ups) == ("Q1", "A1", (("Q2", "A2"),))


@pytest.mark.parametrize("turns, message", [
    ([("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("human", "Q3"), ("gpt", "A3")],
     r"d.json: record 0 \(id='r'\): turn 3 is from 'human' but the turns must alternate human, gpt"),
    ([("human", "Q1"), ("gpt", "A1"), ("gpt", "A2")],
     r"d.json: record 0 \(id='r'\): turn 2 is from 'gpt' but the turns must alternate human, gpt"),
    ([("human", "Q1")], r"d.json: record 0 \(id='r'\) has no human turn followed by a gpt turn"),
])
def test_malformed_turns_are_one_line(tmp_path, turns, message):
    (tmp_path / "d.json").write_text(json.dumps([{"id": "r", "conversations": [{"from": f, "value": v}
                                                                                for f, v in turns]}]))
    with pytest.raises(UserError, match=message) as err:
        llava_examples(tmp_path / "d.json", safe=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_every_gpt_turn(llava_file, family):
    processor = processor_of(family)
    tok = processor.tokenizer
    rows = llava_examples(llava_file, safe=True)
    batch = VLMCollator(processor, max_length=1024, train=True)(rows)
    answers = [[a for _, a in THREE_TURNS], [TEXTS[-1]], ["A red square."]]
    for i, want in enumerate(answers):
        runs = labelled_runs(tok, batch["input_ids"][i], batch["labels"][i])
        # each run: the answer (after the template's space, if any) and one end-of-turn token
        as_decoded = [tok.decode(tok(a, add_special_tokens=False)["input_ids"]) for a in want]  # `tiny` lowercases
        assert [run.removesuffix(tok.eos_token).lstrip() for run in runs] == as_decoded
        assert all(run.endswith(tok.eos_token) and run.count(tok.eos_token) == 1 for run in runs)
        assert "USER" not in "".join(runs) and "user" not in "".join(runs)
    # evaluation sees the first question only
    prompts = VLMCollator(processor, max_length=1024, train=False)(rows[:1])
    prompt = tok.decode(prompts["input_ids"][0], skip_special_tokens=False).lower()
    assert "what is in the picture?" in prompt and "why is it red?" not in prompt


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
@pytest.mark.parametrize("system_prompt", [None, LLAVA_V1_SYSTEM])
def test_a_single_turn_row_is_encoded_as_before(llava_file, family, system_prompt):
    """The single-turn path: prompt + answer as the template places it + EOS; labels after the prompt's
    tokens. A multi-turn row in the same batch changes only the padding."""
    processor = processor_of(family)
    multi, _, single = llava_examples(llava_file, safe=True)
    image = Image.open(single.image).convert("RGB")
    prompt = processor.apply_chat_template(chat_messages([(single.instruction, None)], True, system_prompt),
                                           add_generation_prompt=True, tokenize=False)
    sep = " " if family == "tiny-llava" else ""  # LLaVA-1.5's template puts a space before the answer
    want = processor(text=[prompt + sep + single.response + processor.tokenizer.eos_token], images=[image],
                     return_tensors="pt")["input_ids"][0]
    n_prompt = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    collator = VLMCollator(processor, max_length=1024, train=True, system_prompt=system_prompt)
    alone, mixed = collator([single]), collator([multi, single])
    for batch in (alone, mixed):
        ids, labels = batch["input_ids"][-1], batch["labels"][-1]
        assert ids[-len(want):].tolist() == want.tolist()
        assert bool((labels[:len(ids) - len(want) + n_prompt] == IGNORE_INDEX).all())
        assert labels[len(ids) - len(want) + n_prompt:].tolist() == want[n_prompt:].tolist()


def test_a_long_conversation_is_refused_as_before(llava_file):
    rows = llava_examples(llava_file, safe=True)
    with pytest.raises(UserError, match="record id=multi is .* tokens long, more than data.max_length=40"):
        VLMCollator(processor_of("tiny"), max_length=40, train=True)(rows[:1])


def test_forget_rows_keep_the_first_exchange_and_retain_rows_are_whole(llava_file, capsys):
    from omegaconf import OmegaConf

    from datamodules.forget_retain import ForgetRetainDataModule
    from datamodules.safety import DataFiles

    fr = {"forget_file": str(llava_file), "retain_file": str(llava_file), "forget_source": "data",
          "cue_balance": "none", "retain_general_ratio": 0.0, "max_forget": None}
    cfg = OmegaConf.create({"forget_retain": fr, "batch_size": 2, "num_workers": 0})
    files = DataFiles(train=llava_file, val=llava_file, test=None, image_dir=None, compliance_cue="what",
                      refusal_cue="share")
    dm = ForgetRetainDataModule(cfg, files, processor=None)
    assert [ex.follow_ups for ex in dm.retain_examples()] == [tuple(THREE_TURNS[1:]), (), ()]
    forget = dm.side_examples(llava_file, safe=False)
    assert forget[0].follow_ups and all(not ex.follow_ups for ex in dm.forget_candidates())
    assert "1 multi-turn row(s)" in capsys.readouterr().out
