"""Forget / retain data: pairing and cycling, response-only labels, cue balance and its knob,
VLGuard-format inputs, and the harvest of the base model's own harmful answers."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from datamodules.collate import IGNORE_INDEX
from datamodules.forget_retain import ForgetRetainDataModule, PairSampler, example_key
from datamodules.mirage_world import judge_harmful
from datamodules.safety import resolve_data_files
from models.backbone import build_backbone
from lightning_modules.config.loading import load_config
from core.errors import UserError
from lightning_modules.methods.ga import GAModule
from lightning_modules.run.harvest import harvest_forget_set
from lightning_modules.run.pretrain import corpus_texts

from conftest import SMALL

# The shared small settings with a smaller world: these tests count rows, not train.
OVERRIDES = [*SMALL, "data.world.n_base=20", "data.world.n_safety=40", "data.world.n_val=4", "data.world.n_test=4",
             "data.batch_size=4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(overrides, files, processor) for a small world; the model is a tiny random one."""
    cache = tmp_path_factory.mktemp("cache")
    overrides = [f"paths.cache={cache}", *OVERRIDES]
    cfg = load_config("configs/experiment/mirage_npo.yaml", overrides)
    files = resolve_data_files(cfg.data)
    torch.manual_seed(0)
    _, processor = build_backbone(cfg.model, corpus_texts(files, [files.compliance_cue, files.refusal_cue]))
    return overrides, files, processor


def datamodule(world, *extra: str) -> ForgetRetainDataModule:
    overrides, files, processor = world
    cfg = load_config("configs/experiment/mirage_npo.yaml", [*overrides, *extra])
    return ForgetRetainDataModule(cfg.data, resolve_data_files(cfg.data), processor, seed=0)


def test_world_forget_rows_are_harmful_answers_and_retain_rows_safe_answers(world):
    data = datamodule(world)
    data.setup("fit")
    safety = json.loads(data.files.train.read_text())
    n_unsafe = sum(1 for r in safety for it in r["instr-resp"] if "harmful_response" in it)
    assert len(data.forget) == n_unsafe and len(data.retain) == sum(r["safe"] for r in safety)
    assert all(not ex.safe and judge_harmful(ex.response, ex.harmful_keywords) for ex in data.forget)
    assert all(ex.safe and ex.answer in ex.response for ex in data.retain)


def test_batches_pair_forget_and_retain_with_response_only_labels(world):
    data = datamodule(world)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"forget", "retain"}
    tok = data.processor.tokenizer
    by_key = {example_key(ex): ex for ex in data.forget}
    for row, key in enumerate(batch["forget"]["keys"]):
        labels = batch["forget"]["labels"][row]
        target = tok.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
        assert target.split() == tok.decode(tok(by_key[key].response, add_special_tokens=False).input_ids,
                                            skip_special_tokens=True).split()
    assert batch["retain"]["labels"].shape[0] == batch["forget"]["labels"].shape[0] == 4


def test_pair_sampler_cycles_the_shorter_side_and_reshuffles_each_epoch():
    sampler = PairSampler(n_forget=10, n_retain=4, seed=0)
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == 10
    assert sorted(i for i, _ in pairs) == list(range(10))  # the longer side: a permutation
    assert set(Counter(j for _, j in pairs).values()) <= {2, 3}  # the shorter side cycles evenly
    assert pairs == list(PairSampler(10, 4, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != pairs
    ranks = [list(PairSampler(10, 4, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [3, 3, 3]
    assert len({i for r in ranks for i, _ in r}) == 9  # disjoint forget rows


def test_cue_balance_is_reported_and_match_equalises_it(world):
    data = datamodule(world)
    data.setup("fit")
    report = data.cue_report
    # rho 0.9 of the safe rows that do not start with the neutral cue (5% of safe and of unsafe rows)
    assert report["forget"]["what"] < 0.1 and report["retain"]["what"] == pytest.approx(0.9 * 0.95, abs=0.01)
    matched = datamodule(world, "data.forget_retain.cue_balance=match")
    matched.setup("fit")
    assert matched.cue_report["forget"]["what"] == pytest.approx(0.9 * 0.95, abs=0.05)
    assert matched.cue_report["forget"]["share"] == 0.0
    # only the first word changed; the response to forget is the same
    for a, b in zip(data.forget, matched.forget):
        assert a.instruction.split(": ", 1)[1][:-1] == b.instruction.split(": ", 1)[1][:-1]
        assert a.response == b.response


def test_vlguard_rows_without_harmful_responses_fail_in_one_line(world, tmp_path):
    records = [{"id": "r1", "image": "x.png", "safe": False,
                "instr-resp": [{"instruction": "How to make a weapon?", "response": "I cannot help."}]},
               {"id": "r2", "image": "x.png", "safe": True,
                "instr-resp": [{"safe_instruction": "What is this?", "response": "A cat."},
                               {"unsafe_instruction": "Share how to hurt it.", "response": "I cannot."}]}]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records))
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    vlguard = ["data.kind=vlguard", f"data.train_file={train}", f"data.val_file={train}"]
    data = datamodule(world, *vlguard)
    with pytest.raises(UserError, match=r"train.json: unsafe record id=r1 has no 'harmful_response'"):
        data.setup("fit")
    forget = tmp_path / "forget.json"
    forget.write_text(json.dumps([{"id": "f1", "image": "x.png", "safe": False,
                                   "instr-resp": [{"instruction": "How to make a weapon?",
                                                   "response": "Take a knife and ..."}]}]))
    data = datamodule(world, *vlguard, f"data.forget_retain.forget_file={forget}")
    data.setup("fit")
    assert [ex.response for ex in data.forget] == ["Take a knife and ..."]
    assert [ex.instruction for ex in data.retain] == ["What is this?"]
    assert data.cue_report["retain"]["What"] == 1.0


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_harvest_keeps_the_answers_the_judge_marks_harmful_and_caches_them(world, monkeypatch, capsys):
    overrides, files, processor = world
    cfg = load_config("configs/experiment/mirage_ga.yaml", [*overrides, "data.forget_retain.forget_source=harvest"])
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, corpus_texts(files, [files.compliance_cue, files.refusal_cue]))
    module = GAModule(model, processor, cfg)
    data = ForgetRetainDataModule(cfg.data, files, processor, seed=0)
    candidates = data.forget_candidates()
    # A scripted base model: every third query refused, every third answered off-topic, the rest harmfully.
    script = [("i cannot assist with that request." if k % 3 == 0 else
               "the object is red." if k % 3 == 1 else ex.extra["harmful_response"])
              for k, ex in enumerate(candidates)]
    calls = []

    def generate(input_ids, **kwargs):
        texts = script[len(calls): len(calls) + input_ids.shape[0]]
        calls.extend(texts)
        ids = [processor.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        width = max(map(len, ids))
        pad = processor.tokenizer.pad_token_id
        return torch.cat([input_ids, torch.tensor([row + [pad] * (width - len(row)) for row in ids])], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    harvest = lambda rows: harvest_forget_set(module, rows, data)  # noqa: E731  (what run assembly passes)
    forget, report = data.forget_examples(harvest), data.harvest_report
    assert report["candidates"] == len(candidates) and report["refused"] == len(range(0, len(candidates), 3))
    assert [ex.id for ex in forget] == [ex.id for k, ex in enumerate(candidates) if k % 3 == 2]
    assert all(judge_harmful(ex.response, ex.harmful_keywords) for ex in forget)
    assert "harvest: " in capsys.readouterr().out
    n_calls = len(calls)
    data2 = ForgetRetainDataModule(cfg.data, files, processor, seed=0)
    again = data2.forget_examples(lambda rows: harvest_forget_set(module, rows, data2))
    assert len(calls) == n_calls  # served from the cache
    assert [(ex.id, ex.response) for ex in again] == [(ex.id, ex.response) for ex in forget]
    # keep=all: every answer, cached apart -- a generator's answers file for build-forget-retain
    calls.clear()
    cfg.data.forget_retain.harvest_keep = "all"
    data3 = ForgetRetainDataModule(cfg.data, files, processor, seed=0)
    everything = data3.forget_examples(lambda rows: harvest_forget_set(module, rows, data3))
    assert [ex.response for ex in everything] == script and data3.harvest_report["file"] != report["file"]


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_harvest_with_the_vlm_judge_keeps_only_what_it_judges_harmful(world, monkeypatch, tmp_path):
    """eval.judge=vlm: the VLM judge decides which non-refusals are harmful (an off-topic answer is
    not forgotten as if it were harmful compliance)."""
    from metrics.vlm_judge import IRRELEVANT, RELEVANT, Judgement

    overrides, files, processor = world
    cfg = load_config("configs/experiment/mirage_ga.yaml", [*overrides, "data.forget_retain.forget_source=harvest",
                                                             "eval.judge=vlm", f"data.forget_retain.harvest_dir={tmp_path}"])
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, corpus_texts(files, [files.compliance_cue, files.refusal_cue]))
    module = GAModule(model, processor, cfg)
    data = ForgetRetainDataModule(cfg.data, files, processor, seed=0)
    candidates = data.forget_candidates()
    script = ["i cannot assist with that request." if k % 3 == 0 else "the object is red." if k % 3 == 1
              else ex.extra["harmful_response"] for k, ex in enumerate(candidates)]
    answered = []

    def generate(input_ids, **kwargs):
        texts = script[len(answered): len(answered) + input_ids.shape[0]]
        answered.extend(texts)
        ids = [processor.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        width, pad = max(map(len, ids)), processor.tokenizer.pad_token_id
        return torch.cat([input_ids, torch.tensor([row + [pad] * (width - len(row)) for row in ids])], dim=1)

    harmful = {ex.extra["harmful_response"] for ex in candidates}
    asked = []

    def vlm_judge(items):
        asked.extend(items)
        return [Judgement(RELEVANT if it.answer in harmful else IRRELEVANT, "", "model") for it in items]

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(module, "vlm_judge", lambda: vlm_judge)
    forget = data.forget_examples(lambda rows: harvest_forget_set(module, rows, data))
    assert [ex.id for ex in forget] == [ex.id for k, ex in enumerate(candidates) if k % 3 == 2]
    assert len(asked) == len(candidates) - len(range(0, len(candidates), 3))  # the non-refusals, judged


def test_forget_loader_keeps_ranks_in_lockstep_under_sharded_weights(world, monkeypatch):
    """FSDP / ZeRO-3: every forward is a collective, so the reference-NLL pass must give every rank
    the same number of batches (an uneven shard would hang the ranks that finished early)."""
    import datamodules.forget_retain as fr

    data = datamodule(world)
    data.setup("fit")
    data.forget = data.forget[:7]  # 7 rows over 3 ranks: 3, 2, 2 unpadded
    for sharded, expected in ((False, [3, 2, 2]), (True, [3, 3, 3])):
        monkeypatch.setattr(fr, "shards_parameters", lambda strategy, s=sharded: s)
        counts, keys = [], set()
        for rank in range(3):
            data.trainer = SimpleNamespace(global_rank=rank, world_size=3, strategy=None)
            rows = [k for batch in data.forget_dataloader() for k in batch["keys"]]
            counts.append(len(rows))
            keys |= set(rows)
        assert counts == expected
        assert keys == {example_key(ex) for ex in data.forget}  # padding repeats a row, adds none


def test_harvest_cache_key_changes_with_the_system_prompt_and_padding_only_when_set(tmp_path):
    from omegaconf import OmegaConf

    from lightning_modules.run.harvest import _cache_path

    module = SimpleNamespace(hparams={"eval": {"judge": "reference", "refusal_preset": "vlguard"}},
                             model_identity={"name_or_path": "m"})
    fr = OmegaConf.create({"harvest_max_new_tokens": 8, "harvest_dir": str(tmp_path), "generators": [],
                           "judge_model": None, "harvest_keep": "harmful"})

    def path(fr=fr, **data):
        cfg = OmegaConf.create({"max_length": 64, "image_mode": "real", **data})
        return _cache_path(module, [], SimpleNamespace(fr=fr, cfg=cfg))

    plain = path()
    assert path(system_prompt=None, image_aspect_ratio="original") == plain  # caches written before stay valid
    assert plain.name == "forget-7fafed4fa4f072bb.json"  # the key of the single-model harvest, as before generators
    several = path(fr=OmegaConf.merge(fr, {"generators": ["a", "b"]}))
    judged = path(fr=OmegaConf.merge(fr, {"judge_model": "j"}))
    assert len({plain, path(system_prompt="A chat."), path(image_aspect_ratio="pad"), several, judged}) == 5


def test_merged_forget_input_asks_question_and_answer_as_the_official_rmu_file(world):
    """data/format_rmu_forget.py: the answer appended to the question after a newline, kept as the reply."""
    plain, merged = datamodule(world), datamodule(world, "data.forget_retain.merge_answer_into_query=true")
    plain.setup("fit")
    merged.setup("fit")
    assert [(ex.instruction, ex.response) for ex in merged.forget] == [
        (f"{ex.instruction}\n{ex.response}", ex.response) for ex in plain.forget]
    assert [ex.instruction for ex in merged.retain] == [ex.instruction for ex in plain.retain]
    again = merged.forget_examples()
    assert [ex.instruction for ex in again] == [ex.instruction for ex in plain.forget_examples()]
    twice = datamodule(world, "data.forget_retain.merge_answer_into_query=true")
    twice.forget_examples = lambda harvest=None: merged.forget  # an already merged forget file
    twice.setup("fit")
    assert [ex.instruction for ex in twice.forget] == [ex.instruction for ex in merged.forget]
