"""The forget-set harvest from several generator models (data.forget_retain.generators) with the
official selection judge (data.forget_retain.judge_model): the most harmful answer is chosen, a
judge naming none falls back to the run's judge (counted), each generator's answers are cached as a
file `build-forget-retain --answers` reads; once with scripted generators and judge, once through
the real loading path with saved toy generators and a saved toy chat judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models.backbone as backbone
import models.chat_judge as chat_judge
from core.errors import UserError
from datamodules import official_pipeline as official
from datamodules.forget_retain import ForgetRetainDataModule
from datamodules.safety import resolve_data_files
from lightning_modules.config.loading import load_config
from lightning_modules.methods.ga import GAModule
from lightning_modules.run.harvest import harvest_forget_set
from lightning_modules.run.pretrain import corpus_texts
from models.backbone import build_backbone

from conftest import SMALL
from tiny_lm import CHAT_TEMPLATE, JUDGE_TEXTS, save_tiny_lm

OVERRIDES = [*SMALL, "data.world.n_base=20", "data.world.n_safety=24", "data.world.n_val=4", "data.world.n_test=4",
             "data.forget_retain.forget_source=harvest", "data.forget_retain.max_forget=8"]
REFUSAL = "i cannot assist with that request."
OFF_TOPIC = "the object is red."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(cfg, files, module) of a small world with a random tiny model; the run's judge is the world's."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config("configs/experiment/mirage_ga.yaml", [f"paths.cache={cache}", *OVERRIDES])
    files = resolve_data_files(cfg.data)
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, corpus_texts(files, [files.compliance_cue, files.refusal_cue]))
    return cfg, files, GAModule(model, processor, cfg)


def harvest(setup, tmp_path, *overrides):
    cfg, files, module = setup
    cfg = load_config("configs/experiment/mirage_ga.yaml", [f"paths.cache={cfg.paths.cache}", *OVERRIDES,
                                                             f"data.forget_retain.harvest_dir={tmp_path}", *overrides])
    data = ForgetRetainDataModule(cfg.data, files, module.processor, seed=0)
    candidates = data.forget_candidates()
    return candidates, data.forget_examples(lambda rows: harvest_forget_set(module, rows, data)), data.harvest_report


def scripted(module, answers_of):
    """A generator whose greedy answer to the k-th query is answers_of(k) (the run's tiny model
    answering a script: the harvest only sees its generate)."""
    tokenizer, asked = module.processor.tokenizer, []

    def generate(input_ids, **kwargs):
        texts = [answers_of(k) for k in range(len(asked), len(asked) + input_ids.shape[0])]
        asked.extend(texts)
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        width = max(map(len, ids))
        rows = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    model = torch.nn.Linear(1, 1)  # parameters only for the device; generation is scripted
    model.generate, model.generation_config = generate, module.model.generation_config
    return model, asked


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_two_generators_a_judge_picks_the_most_harmful_and_answers_are_cached(setup, tmp_path, monkeypatch):
    cfg, files, module = setup
    data = ForgetRetainDataModule(load_config("configs/experiment/mirage_ga.yaml", [
        f"paths.cache={cfg.paths.cache}", *OVERRIDES]).data, files, module.processor, seed=0)
    queries = data.forget_candidates()
    harmful = [ex.extra["harmful_response"] for ex in queries]
    # A refuses everything; B answers harmfully every second query and off-topic otherwise.
    gens = {"gen/a": scripted(module, lambda k: REFUSAL), "gen/b": scripted(module, lambda k: harmful[k] if k % 2 else OFF_TOPIC)}
    loads = []
    monkeypatch.setattr(backbone, "load_pretrained", lambda mc: loads.append(mc.name_or_path) or (gens[mc.name_or_path][0], module.processor))
    judged = []

    def judge(conversation):  # names the numbered answer that is a harmful response, or none
        judged.append(conversation)
        return next((line.split(".")[0] for line in conversation[1]["content"].splitlines()
                     if any(h and h in line for h in harmful)), "none is harmful")

    monkeypatch.setattr(chat_judge.ChatJudge, "from_pretrained", classmethod(lambda cls, name, **kw: judge))
    both = ["data.forget_retain.generators=[gen/a,gen/b]"]
    _, rows, report = harvest(setup, tmp_path, *both, "data.forget_retain.judge_model=toy/judge")
    assert [ex.id for ex in rows] == [ex.id for k, ex in enumerate(queries) if k % 2]
    assert [ex.response for ex in rows] == [h for k, h in enumerate(harmful) if k % 2]
    assert report["picked"] == [0, len(rows)] and report["judge_unparsed"] == len(queries) - len(rows)
    assert report["refused"] == 0 and report["other"] == len(queries) - len(rows)  # B never refused
    assert judged[0][1]["content"].startswith("For the image '") and f"\n1. {REFUSAL}" in judged[0][1]["content"]
    assert loads == ["gen/a", "gen/b"]
    # each generator's answers: a VLGuard-format file that build-forget-retain --answers reads
    files_written = sorted(tmp_path.glob("answers-*.json"))
    assert len(files_written) == 2
    tables = [official.read_answers(f) for f in files_written]
    assert sorted(set(t.values()) == {REFUSAL} for t in tables) == [False, True]
    # the rule alone (no judge): the first answer the run's judge marks harmful -- the same rows here;
    # the generators' answers come from their caches (nothing loaded, nothing generated)
    asked = [len(gens[g][1]) for g in gens]
    _, rule_rows, rule_report = harvest(setup, tmp_path, *both)
    assert [ex.response for ex in rule_rows] == [ex.response for ex in rows] and loads == ["gen/a", "gen/b"]
    assert [len(gens[g][1]) for g in gens] == asked and rule_report["judge_unparsed"] == 0
    assert rule_report["file"] != report["file"]
    with pytest.raises(UserError, match="harvest_keep=all writes one generator's answers"):
        harvest(setup, tmp_path, *both, "data.forget_retain.harvest_keep=all")


@pytest.mark.slow  # seconds per case: out of make test-fast
def test_the_real_loading_path_with_saved_toy_generators_and_a_toy_chat_judge(setup, tmp_path, monkeypatch):
    cfg, files, module = setup
    directories = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model, processor = build_backbone(cfg.model, corpus_texts(files, [files.compliance_cue, files.refusal_cue]))
        directories.append(tmp_path / f"gen{seed}")
        model.save_pretrained(directories[-1])
        processor.save_pretrained(directories[-1])
    save_tiny_lm(tmp_path / "judge", JUDGE_TEXTS, CHAT_TEMPLATE)
    # The rule's part: every answer counts as harmful here (random models write no harmful keyword),
    # so each query keeps the judge's pick or, when it names none, the first generator's answer.
    monkeypatch.setattr(module, "judge_batch", lambda exs, answers: (
        [type("V", (), {"harmful": True, "refusal": False})() for _ in answers], None))
    gens = f"data.forget_retain.generators=[{directories[0]},{directories[1]}]"
    candidates, rows, report = harvest(setup, tmp_path / "h", gens, f"data.forget_retain.judge_model={tmp_path / 'judge'}",
                                       "data.forget_retain.harvest_max_new_tokens=4")
    answers = [[rec["instr-resp"][0]["response"] for rec in json.loads(p.read_text())]
               for p in sorted((tmp_path / "h").glob("answers-*.json"))]
    assert len(answers) == 2 and all(len(a) == len(candidates) for a in answers)
    assert len(rows) == len(candidates) == report["harmful"] and sum(report["picked"]) == len(rows)
    assert all(ex.response in (answers[0][k], answers[1][k]) for k, ex in enumerate(rows))
    assert 0 <= report["judge_unparsed"] <= len(candidates)
    with pytest.raises(UserError, match="data.forget_retain.generators: cannot load model.name_or_path="):
        harvest(setup, tmp_path / "bad", f"data.forget_retain.generators=[{tmp_path / 'missing'}]")


def test_official_halves_unsafes_only(setup, tmp_path):
    """forget_halves=unsafes keeps the safe=false records' queries of a prepared forget_queries.json."""
    from vlguard_fixture import prepared_vlguard

    base = ["data=vlguard", f"data.root={prepared_vlguard(tmp_path)}", "data.forget_retain.forget_source=harvest"]
    counts = {}
    for halves in ("both", "unsafes"):
        c = load_config("configs/experiment/vlguard_npo.yaml", [*base, f"data.forget_retain.forget_halves={halves}"])
        data = ForgetRetainDataModule(c.data, resolve_data_files(c.data), None, seed=0)
        counts[halves] = {ex.subset for ex in data.forget_candidates()}, len(data.forget_candidates())
    train = json.loads((tmp_path / "prep" / "train.json").read_text())
    assert counts["unsafes"] == ({"unsafes"}, sum(not r["safe"] for r in train))
    assert counts["both"] == ({"unsafes", "safe_unsafes"}, len(train))
    assert Path(tmp_path / "prep" / "forget_queries.json").is_file()
