"""The official forget/retain pipeline (datamodules/official_pipeline.py, llava_format.py): forget =
unsafes with the most harmful of several generators' answers, retain topped up to N from a LLaVA
file with multi-turn and text-only rows, the RMU merged input, LLaVA files read as forget / retain
files, the epoch over the retain set, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from vlguard_fixture import prepared_vlguard

from core.errors import UserError
from datamodules import official_pipeline as official
from datamodules import vlguard
from datamodules.examples import vlguard_examples
from datamodules.forget_retain import PairSampler
from datamodules.llava_format import llava_examples, to_llava_record, write_llava

HARMFUL = "Step one: buy the parts. Step two: assemble them."


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_vlguard(tmp_path_factory.mktemp("official"))


def general_file(path: Path, n: int = 30) -> Path:
    """A LLaVA-665K-like file: image rows, multi-turn rows and text-only rows."""
    records = []
    for i in range(n):
        rec = {"id": f"g{i}", "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                                 {"from": "gpt", "value": f"A cat number {i}."}]}
        if i % 3 == 0:
            rec["image"] = f"coco/{i}.jpg"
        if i % 3 == 1:  # multi-turn
            rec["conversations"] += [{"from": "human", "value": "And its color?"}, {"from": "gpt", "value": "Grey."}]
        if i % 3 == 2:  # text-only
            rec["conversations"][0]["value"] = f"Write a poem about the number {i}."
        records.append(rec)
    records[5]["conversations"][1]["value"] = "Here is how to build a weapon."  # for the safety filter
    path.write_text(json.dumps(records))
    return path


def answers(prep: Path, tmp: Path) -> tuple[Path, Path]:
    """Two generators: A refuses every query (official {image: answer} file keyed by VLGuard's own
    relative image path), B answers harmfully (a harvest-style VLGuard-format file)."""
    queries = official.forget_queries(prep / "train.json")
    a = {"/".join(Path(ex.image).parts[-2:]): "I'm sorry, I cannot help with that." for ex in queries}
    b = [{"id": ex.id, "image": ex.image, "safe": False,
          "instr-resp": [{"instruction": ex.instruction, "response": HARMFUL}]} for ex in queries]
    (tmp / "a.json").write_text(json.dumps(a))
    (tmp / "b.json").write_text(json.dumps(b))
    return tmp / "a.json", tmp / "b.json"


def test_forget_is_the_unsafes_with_the_selected_answer_and_retain_is_n(prepared, tmp_path):
    a, b = answers(prepared, tmp_path)
    gen = general_file(tmp_path / "general.json")
    report = official.build(prepared / "train.json", prepared / "retain.json", tmp_path / "out", [a, b], gen,
                            target_size=25, seed=42)
    train = json.loads((prepared / "train.json").read_text())
    unsafes = {r["id"] for r in train if not r["safe"]}
    forget = json.loads((tmp_path / "out" / "train_forget.json").read_text())
    assert {r["id"] for r in forget} == unsafes and report["kept"] == len(unsafes)
    # no judge: the first non-refusal, i.e. generator B's harmful answer
    assert all(r["conversations"][1]["value"] == HARMFUL for r in forget)
    assert all(r["conversations"][0]["value"].startswith("<image>") for r in forget)
    rmu = json.loads((tmp_path / "out" / "train_forget_qa_full.json").read_text())
    assert [r["conversations"][0]["value"] for r in rmu] == [
        f"{r['conversations'][0]['value']}\n{HARMFUL}" for r in forget]
    retain = json.loads((tmp_path / "out" / "train_retain_mixed.json").read_text())
    n_safe = sum(r["safe"] for r in train)
    assert len(retain) == 25 and report["retain_vlguard"] == n_safe and report["retain_general"] == 25 - n_safe
    # seeded and stable; another seed draws other general rows
    again = official.build(prepared / "train.json", prepared / "retain.json", tmp_path / "again", [a, b], gen,
                           target_size=25, seed=42)
    assert (tmp_path / "again" / "train_retain_mixed.json").read_text() == \
        (tmp_path / "out" / "train_retain_mixed.json").read_text() and again == {**report}
    official.build(prepared / "train.json", prepared / "retain.json", tmp_path / "other", [a, b], gen,
                   target_size=25, seed=1)
    other = json.loads((tmp_path / "other" / "train_retain_mixed.json").read_text())
    assert [r["id"] for r in other] != [r["id"] for r in retain]
    # general rows are kept whole: multi-turn and text-only rows as in the source
    general = {r["id"]: r for r in retain if r["id"].startswith("g")}
    assert any(len(r["conversations"]) == 4 for r in general.values())
    assert any("image" not in r for r in general.values())


def test_both_halves_and_the_safety_filter(prepared, tmp_path):
    _, b = answers(prepared, tmp_path)
    queries = official.forget_queries(prepared / "train.json", "both")
    assert {ex.subset for ex in queries} == {"unsafes", "safe_unsafes"}
    b_both = [{"id": ex.id, "image": ex.image, "safe": False,
               "instr-resp": [{"instruction": ex.instruction, "response": HARMFUL}]} for ex in queries]
    b.write_text(json.dumps(b_both))
    gen = general_file(tmp_path / "general.json")
    keep = official.blocklist_filter(["weapon"])
    official.build(prepared / "train.json", prepared / "retain.json", tmp_path / "out", [b], gen, halves="both",
                   target_size=10_000, keep=keep)
    forget = json.loads((tmp_path / "out" / "train_forget.json").read_text())
    retain = json.loads((tmp_path / "out" / "train_retain_mixed.json").read_text())
    assert len(forget) == len(queries)
    assert "g5" not in {r["id"] for r in retain} and "g4" in {r["id"] for r in retain}


def test_a_judge_picks_the_most_harmful_answer_with_the_official_prompt(prepared, tmp_path):
    a, b = answers(prepared, tmp_path)
    seen = []

    def judge(conversation):  # a stub judge that reads the numbered list and names the harmful one
        seen.append(conversation)
        lines = conversation[1]["content"].splitlines()
        return next(line.split(".")[0] for line in lines if HARMFUL in line)

    rows, report = official.harmful_forget(official.forget_queries(prepared / "train.json"), [a, b], judge)
    assert all(ex.response == HARMFUL for ex in rows) and report["selection"] == "judge"
    assert seen[0][0] == {"role": "system", "content": official.JUDGE_SYSTEM}
    assert seen[0][1]["content"].endswith("Please respond with only the number corresponding to the most harmful answer.")
    assert "\n1. I'm sorry" in seen[0][1]["content"] and f"\n2. {HARMFUL}" in seen[0][1]["content"]
    # a judge naming no answer: the keyword rule chooses there (B's harmful answer), and it is counted
    rows, report = official.harmful_forget(official.forget_queries(prepared / "train.json"), [a, b], lambda c: "no idea")
    assert all(ex.response == HARMFUL for ex in rows) and report["judge_unparsed"] == len(rows) > 0
    # a judge naming the refusal is followed (the official choice is the judge's, not the rule's)
    rows, report = official.harmful_forget(official.forget_queries(prepared / "train.json"), [a, b], lambda c: "1")
    assert all(ex.response.startswith("I'm sorry") for ex in rows) and report["judge_unparsed"] == 0


@pytest.mark.parametrize("reply, n, choice", [
    ("2", 3, 1), (" 1 ", 2, 0), ("The most harmful answer is 3.", 3, 2), ("Answer 2, then 1.", 2, 1),
    ("4", 3, None), ("0", 3, None), ("None of them is harmful.", 2, None), ("", 2, None),
])
def test_the_judge_reply_parsed_as_the_official_rule_except_out_of_range(reply, n, choice):
    assert official.parse_choice(reply, n) == choice


def test_the_real_judge_loading_path_with_a_tiny_chat_model(tmp_path):
    from tiny_lm import CHAT_TEMPLATE, JUDGE_TEXTS, save_tiny_lm

    from models.chat_judge import ChatJudge

    save_tiny_lm(tmp_path / "judge", JUDGE_TEXTS, CHAT_TEMPLATE)
    judge = ChatJudge.from_pretrained(str(tmp_path / "judge"), dtype="float32", max_new_tokens=4)
    reply = judge(official.judge_conversation("x.png", ["one", "two"]))
    assert isinstance(reply, str) and reply == judge(official.judge_conversation("x.png", ["one", "two"]))
    # a random model answers nonsense or a number: either way one line or a valid choice
    assert official.parse_choice(reply, 2) in (0, 1, None)
    with pytest.raises(UserError, match="cannot load judge model"):
        ChatJudge.from_pretrained(str(tmp_path / "missing"))


def test_llava_round_trip_and_llava_files_as_forget_and_retain_files(prepared, tmp_path):
    examples = vlguard_examples(prepared / "train.json")
    write_llava(tmp_path / "rt.json", [to_llava_record(ex) for ex in examples])
    back = llava_examples(tmp_path / "rt.json", safe=True)
    assert [(e.id, e.image, e.instruction, e.response, e.safe, e.subset) for e in back] == \
        [(e.id, e.image, e.instruction, e.response, e.safe, e.subset) for e in examples]
    # the official files carry no 'safe': the side decides; multi-turn rows carry their later exchanges
    gen = general_file(tmp_path / "general.json", n=6)
    rows = llava_examples(gen, safe=True, image_dir=tmp_path / "imgs")
    assert rows[1].instruction == "What is in picture 1?" and rows[1].follow_ups == (("And its color?", "Grey."),)
    assert rows[0].image == str(tmp_path / "imgs" / "coco/0.jpg") and rows[2].image is None

    from datamodules.forget_retain import ForgetRetainDataModule
    from datamodules.safety import resolve_data_files
    from lightning_modules.config.schema import DataSettings

    a, b = answers(prepared, tmp_path)
    official.build(prepared / "train.json", prepared / "retain.json", tmp_path / "out", [a, b], gen, target_size=20)
    for rec_file in ("train_forget.json", "train_retain_mixed.json"):  # as the official release: no 'safe'
        recs = json.loads((tmp_path / "out" / rec_file).read_text())
        (tmp_path / "out" / rec_file).write_text(json.dumps([{k: v for k, v in r.items() if k != "safe"} for r in recs]))
    cfg = OmegaConf.merge(OmegaConf.structured(DataSettings), {
        "kind": "vlguard", "root": str(prepared), "forget_retain": {
            "forget_file": str(tmp_path / "out" / "train_forget.json"),
            "retain_file": str(tmp_path / "out" / "train_retain_mixed.json"), "epoch_over": "retain"}})
    dm = ForgetRetainDataModule(cfg, resolve_data_files(cfg), processor=None)
    forget, retain = dm.forget_examples(), dm.retain_examples()
    assert len(retain) == 20 and all(not ex.safe for ex in forget) and all(ex.response == HARMFUL for ex in forget)
    assert any(ex.follow_ups for ex in retain)  # the general top-up's multi-turn rows are trained whole
    assert all(Path(ex.image).is_file() for ex in forget)


def test_an_epoch_over_the_retain_set_cycles_the_forget_set():
    sampler = PairSampler(n_forget=3, n_retain=8, seed=0, epoch_over="retain")
    pairs = list(sampler)
    assert len(sampler) == len(pairs) == 8 and sorted(j for _, j in pairs) == list(range(8))
    assert {i for i, _ in pairs} == {0, 1, 2}
    assert len(PairSampler(n_forget=12, n_retain=8, seed=0, epoch_over="retain")) == 8
    assert len(PairSampler(n_forget=12, n_retain=8, seed=0)) == 12  # the default: the longer set


def test_bad_inputs_are_one_line(prepared, tmp_path):
    a, _ = answers(prepared, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x", "conversations": [{"from": "human", "value": "hi"}]}]')
    with pytest.raises(UserError, match=r"bad.json: record 0 \(id='x'\) has no human turn followed by a gpt turn"):
        official.general_records(bad)
    bad.write_text('[{"id": "x", "conversations": [{"from": "robot", "value": 3}]}]')
    with pytest.raises(UserError, match=r"bad.json: record 0 \(id='x'\): 'conversations' must be a list"):
        llava_examples(bad, safe=True)
    bad.write_text('[{"id": "x", "conversations": [')
    with pytest.raises(UserError, match="bad.json: malformed JSON at line 1"):
        official.general_records(bad)
    partial = json.loads(a.read_text())
    partial.pop(next(iter(partial)))
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(UserError, match=r"partial.json: no answer for query id="):
        official.harmful_forget(official.forget_queries(prepared / "train.json"), [tmp_path / "partial.json"], None)
    with pytest.raises(UserError, match="answers file not found"):
        official.harmful_forget(official.forget_queries(prepared / "train.json"), [tmp_path / "nope.json"], None)
    with pytest.raises(UserError, match="no forget rows: every generator refused"):
        official.build(prepared / "train.json", prepared / "retain.json", tmp_path / "o", [a])


def test_the_command_end_to_end(prepared, tmp_path, capsys):
    a, b = answers(prepared, tmp_path)
    gen = general_file(tmp_path / "general.json")
    vlguard.main(["build-forget-retain", "--root", str(prepared), "--out", str(tmp_path / "out"),
                  "--answers", str(a), str(b), "--general", str(gen), "--target-size", "25",
                  "--general-blocklist", "weapon"])
    out = capsys.readouterr().out
    assert "retain: 25" in out and "forget_file=" in out
    with pytest.raises(SystemExit) as exit_:
        vlguard.main(["build-forget-retain", "--root", str(prepared), "--out", str(tmp_path / "o2"),
                      "--answers", str(a), "--judge-model", str(tmp_path / "no-such-model")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load judge model" in err and len(err.splitlines()) == 1


def test_sft_general_file_may_be_a_llava_file(prepared, tmp_path):
    """VLGuard's Post-hoc recipe: a LLaVA-665K-like file as data.general_file, sampled as is."""
    from datamodules.safety import SafetyDataModule, resolve_data_files
    from lightning_modules.config.schema import DataSettings

    gen = general_file(tmp_path / "general.json", n=9)
    cfg = OmegaConf.merge(OmegaConf.structured(DataSettings), {
        "kind": "vlguard", "root": str(prepared), "general_file": str(gen), "general_samples": 6})
    dm = SafetyDataModule(cfg, resolve_data_files(cfg), processor=None)
    rows = dm.train_dataset()
    general = [ex for ex in rows if ex.id.startswith("g")]
    assert len(general) == 6 and all(ex.safe for ex in general)
    assert any(ex.image is None for ex in general) or any(ex.follow_ups for ex in general)
