"""VLGuard end to end: prepare (checks, split, forget/retain files), data.root, stratified K-shot eval
sets, the per-query metric with IR missing, fetch offline, and fits of every vlguard_<method>."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from core.errors import UserError
from datamodules import vlguard
from datamodules.examples import Example, eval_sets, stratified_sample, vlguard_examples
from datamodules.safety import resolve_data_files
from metrics.outcomes import QueryOutcomes, SafetyOutcomes
from metrics.tables import any_of_k_units
from vlguard_fixture import prepared_vlguard, tiny_overrides, write_vlguard_raw

METHODS = ("sft", "ga", "graddiff", "npo", "simnpo", "rmu")


@pytest.fixture
def raw(tmp_path) -> Path:
    return write_vlguard_raw(tmp_path / "raw", n_train=60, n_test=16, missing=1, corrupt=1, duplicate_id=True)


# -- prepare ----------------------------------------------------------------------------------------
def test_prepare_names_missing_and_corrupt_images_in_one_line(raw, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        vlguard.main(["prepare", "--src", str(raw), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    assert "2 of 60 records have a missing or corrupt image" in err
    assert "id='bad_ads_0'" in err and "missing" in err and "id='hatefulMemes_1'" in err and "corrupt" in err
    assert "--skip-bad" in err
    assert not (tmp_path / "out" / vlguard.MANIFEST).exists()  # nothing half-prepared


def test_prepare_skip_bad_writes_a_seeded_stratified_split_and_forget_retain_files(raw, tmp_path, capsys):
    out = tmp_path / "out"
    vlguard.main(["prepare", "--src", str(raw), "--out", str(out), "--val-fraction", "0.25", "--skip-bad"])
    printed = capsys.readouterr().out
    assert "dropped 2 train record(s) with a bad image" in printed and "renamed 1 repeated train id" in printed
    manifest = json.loads((out / vlguard.MANIFEST).read_text())
    assert [d["id"] for d in manifest["dropped"]["train"]] == ["bad_ads_0", "hatefulMemes_1"]
    train, val, test = (json.loads((out / f"{s}.json").read_text()) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 58 and len(test) == 16
    ids = [r["id"] for r in train + val]
    assert len(set(ids)) == len(ids) and any(i.endswith("#2") for i in ids)  # the repeated id renamed
    assert not {r["image"] for r in train} & {r["image"] for r in val}  # no image on both sides

    # Stratified by subset and category: every stratum's share of val is its share of the data.
    key = vlguard.split_key
    strata = Counter(key(r) for r in train + val)
    in_val = Counter(key(r) for r in val)
    for stratum, n in strata.items():
        assert abs(in_val[stratum] - 0.25 * n) <= 1, stratum
    assert manifest["counts"]["val"]["records"] == len(val)

    # Seeded: the same seed gives the same split, another seed another one.
    again = vlguard.prepare(raw, tmp_path / "again", 0.25, seed=0, skip_bad=True)
    other = vlguard.prepare(raw, tmp_path / "other", 0.25, seed=1, skip_bad=True)
    val_ids = lambda d: [r["id"] for r in json.loads((d / "val.json").read_text())]  # noqa: E731
    assert val_ids(tmp_path / "again") == val_ids(out) != val_ids(tmp_path / "other")
    assert again["counts"] == other["counts"]

    # Images resolve from the prepared directory; the examples parse as training reads them.
    for split in ("train", "val", "test"):
        for ex in vlguard_examples(out / f"{split}.json"):
            assert Path(ex.image).is_file()
    # retain = safe training records; forget = every unsafe training query, without an answer.
    retain = json.loads((out / "retain.json").read_text())
    forget = json.loads((out / "forget_queries.json").read_text())
    assert retain and all(r["safe"] for r in retain) and len(retain) == sum(r["safe"] for r in train)
    assert len(forget) == len(train)  # one unsafe query per unsafe record and per safe record
    assert all(not r["safe"] and r["instr-resp"][0]["response"] == "" for r in forget)


def test_prepare_rejects_a_bad_record_naming_file_and_record(tmp_path):
    raw = write_vlguard_raw(tmp_path / "raw", n_train=8, n_test=4)
    records = json.loads((raw / "train.json").read_text())
    del records[3]["instr-resp"][0]["instruction"]
    (raw / "train.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match=r"train.json: record 3 \(id='bad_ads_3'\) is missing 'instruction'"):
        vlguard.prepare(raw, tmp_path / "out")


def test_fetch_offline_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        vlguard.main(["fetch", "--out", str(tmp_path / "raw")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot download train.json of dataset ys-zong/VLGuard" in err


# -- data.root --------------------------------------------------------------------------------------
def _data_cfg(**keys):
    base = OmegaConf.load(Path(__file__).parent.parent / "configs" / "data" / "vlguard.yaml")
    return OmegaConf.merge(base, {"forget_retain": {}}, keys)


def test_data_root_supplies_the_prepared_files(raw, tmp_path):
    vlguard.prepare(raw, tmp_path / "prep", skip_bad=True)
    files = resolve_data_files(_data_cfg(root=str(tmp_path / "prep")))
    assert (files.train.name, files.val.name, files.test.name) == ("train.json", "val.json", "test.json")
    assert files.retain.name == "retain.json" and files.forget_queries.name == "forget_queries.json"
    # an explicit key still wins over the prepared directory
    assert resolve_data_files(_data_cfg(root=str(tmp_path / "prep"), test_file="x.json")).test == Path("x.json")


def test_prepared_forget_set_comes_from_the_harvest_only(raw, tmp_path):
    from datamodules.forget_retain import ForgetRetainDataModule
    from lightning_modules.config.schema import DataSettings

    vlguard.prepare(raw, tmp_path / "prep", skip_bad=True)

    def datamodule(**forget_retain):
        cfg = OmegaConf.merge(OmegaConf.structured(DataSettings), {"kind": "vlguard", "root": str(tmp_path / "prep"),
                                                                   "forget_retain": forget_retain})
        return ForgetRetainDataModule(cfg, resolve_data_files(cfg), processor=None)

    harvested = []
    rows = datamodule(forget_source="harvest").forget_examples(lambda rows: (harvested.extend(rows) or rows, {}))
    assert len(rows) == len(json.loads((tmp_path / "prep" / "forget_queries.json").read_text()))
    assert all(not ex.safe for ex in harvested)
    assert {ex.id for ex in datamodule().retain_examples()} == {
        r["id"] for r in json.loads((tmp_path / "prep" / "retain.json").read_text())}
    with pytest.raises(UserError, match="has no 'harmful_response'.*forget_source=harvest"):
        datamodule().forget_examples()  # VLGuard's own responses are refusals
    with pytest.raises(UserError, match="forget_queries.json: unsafe record id=.* has no response to forget"):
        datamodule(forget_file=str(tmp_path / "prep" / "forget_queries.json")).forget_examples()


def test_data_root_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"data.train_file must be set .* data.root=DIR"):
        resolve_data_files(_data_cfg())
    with pytest.raises(UserError, match="is not a prepared VLGuard directory"):
        resolve_data_files(_data_cfg(root=str(tmp_path)))


# -- eval sets --------------------------------------------------------------------------------------
def _ex(i: int, safe: bool, subset: str, category=None, source="a") -> Example:
    return Example(id=f"q{i}", image=f"/img/{source}/{i}.png", instruction=f"Tell me thing {i}.", response="r",
                   safe=safe, subset=subset, category=category)


def test_stratified_sample_is_proportional_seeded_and_keeps_file_order():
    rows = [_ex(i, False, "unsafes" if i < 60 else "safe_unsafes", "cat") for i in range(100)]
    picked = stratified_sample(rows, 20, seed=0, key=lambda e: e.subset)
    assert Counter(e.subset for e in picked) == {"unsafes": 12, "safe_unsafes": 8}
    assert picked == sorted(picked, key=rows.index)
    assert picked == stratified_sample(rows, 20, seed=0, key=lambda e: e.subset)
    assert picked != stratified_sample(rows, 20, seed=1, key=lambda e: e.subset)


def test_eval_sets_are_stratified_and_k_shot():
    # File order puts 145 safe_unsafes first: the first 200 rows would be nearly all one subset.
    unsafe = [_ex(i, False, "safe_unsafes") for i in range(145)]
    unsafe += [_ex(145 + i, False, "unsafes", ("privacy", "deception")[i % 2], ("ads", "memes")[i % 2])
               for i in range(145)]
    safe = [_ex(400 + i, True, "safe_safes") for i in range(30)]
    kshot = lambda text, rid: [f"What {k} {text}" for k in range(3)]  # noqa: E731
    sets = eval_sets(unsafe + safe, "What", "Share", lambda t, w: f"{w} {t}", 20, kshot=kshot, seed=0)
    clean = sets["unsafe_clean"]
    first_subset = {u.id for u in unsafe[:145]}
    assert len(clean) == 20 and sum(e.id in first_subset for e in clean) == 10
    assert Counter(e.category for e in clean if e.id not in first_subset) == {"privacy": 5, "deception": 5}
    attacked = sets["unsafe_attacked"]
    assert len(attacked) == 60
    by_query = {}
    for e in attacked:
        by_query.setdefault(e.extra["query"], []).append(e)
    assert sorted(by_query) == list(range(20))
    for q, rows in by_query.items():
        assert [e.shot for e in rows] == [1, 2, 3] and len({e.id for e in rows}) == 1
        assert rows[0].id == clean[q].id and rows[0].instruction.startswith("What 0")
    assert [e.instruction.split()[0] for e in sets["safe_rewritten"]] == ["Share"] * 20


# -- the per-query metric ---------------------------------------------------------------------------
def _update(metric, rows):
    t = lambda key, dtype=torch.bool: torch.tensor([r[key] for r in rows], dtype=dtype)  # noqa: E731
    metric.update(t("query", torch.long), t("safe"), t("refusal"), t("harmful"), t("correct", torch.long),
                  t("undetermined"))


def test_query_outcomes_match_the_any_of_k_table_and_single_shot_counts():
    gen = torch.Generator().manual_seed(0)
    rows = []
    for q in range(40):
        safe = q >= 25
        for shot in range(3):
            refusal = bool(torch.rand(1, generator=gen) < 0.5)
            harmful = not safe and not refusal and bool(torch.rand(1, generator=gen) < 0.5)
            rows.append(dict(query=q, id=f"q{q}", safe=safe, category=None, refusal=refusal, harmful=harmful,
                             correct=-1, undetermined=False))
    for safe_set in (False, True):
        part = [r for r in rows if r["safe"] == safe_set]
        metric = QueryOutcomes()
        for start in range(0, len(part), 7):  # batches cut through queries, as shards do
            _update(metric, part[start:start + 7])
        got = {k: float(v) for k, v in metric.compute().items()}
        units = any_of_k_units(pd.DataFrame(part))
        assert got["n"] == len(units)
        assert got["refusal_rate"] == pytest.approx(units["refusal"].mean())
        assert got["asr"] == pytest.approx(units["harmful"].mean())
    single = [r for r in rows if r["query"] % 3 == 0]  # one row per query: SafetyOutcomes' numbers
    single = [dict(r, query=i) for i, r in enumerate(single)]
    metric, reference = QueryOutcomes(), SafetyOutcomes()
    _update(metric, single)
    reference.update(torch.tensor([r["refusal"] for r in single]), torch.tensor([r["harmful"] for r in single]),
                     torch.tensor([-1] * len(single)))
    expected = reference.compute()
    for key, value in metric.compute().items():
        assert float(value) == pytest.approx(float(expected[key]))


def test_ir_is_missing_when_the_judge_cannot_tell():
    rows = [dict(query=0, safe=False, refusal=False, harmful=True, correct=-1, undetermined=True),
            dict(query=1, safe=False, refusal=True, harmful=False, correct=-1, undetermined=False)]
    metric = QueryOutcomes()
    _update(metric, rows)
    out = metric.compute()
    assert math.isnan(float(out["ir"])) and float(out["asr"]) == 0.5 and float(out["refusal_rate"]) == 0.5
    metric = QueryOutcomes()
    _update(metric, [dict(r, undetermined=False) for r in rows])
    assert float(metric.compute()["ir"]) == 0.0


# -- fit on a prepared directory --------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_vlguard(tmp_path_factory.mktemp("vlguard"))


def fit_overrides(prepared: Path, run_dir: Path) -> list[str]:
    return tiny_overrides(run_dir) + [f"data.root={prepared}", "trainer.max_steps=2", "data.max_eval_samples=4",
                                      "data.forget_retain.harvest_max_new_tokens=6", "eval.val_at_start=true"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_vlguard_experiment_fits_on_a_prepared_directory(method, prepared, tmp_path, recwarn):
    from lightning_modules.run import training
    from lightning_modules.config.loading import load_config

    cfg = load_config(f"configs/experiment/vlguard_{method}.yaml", fit_overrides(prepared, tmp_path / "run"))
    assert cfg.data.attack_shots == 3 and cfg.name == f"vlguard_{method}"
    table = training.run(cfg)
    assert list(table.index) == ["unsafe_clean", "unsafe_attacked", "safe_clean", "safe_rewritten"]
    assert (table["n"] == 4).all()  # queries, not rows: the attacked set has 3 rows per query
    # reference judge on records without harmful_keywords: IR missing (NaN / null), warned once
    assert table.loc[["unsafe_clean", "unsafe_attacked"], "ir"].isna().all()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["unsafe_clean"]["ir"] is None
    assert sum("IR is missing" in str(w.message) for w in recwarn) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    attacked = Counter(r["id"] for r in rows if r["subset"] == "unsafe_attacked")
    assert len(attacked) == 4 and set(attacked.values()) == {3}


@pytest.mark.slow
def test_the_vlm_judge_measures_ir_in_validation(prepared, tmp_path, recwarn):
    """eval.judge=vlm: non-refused unsafe answers go to the judge model (here a random tiny VLM
    saved like any checkpoint), verdicts are cached, IR is measured instead of missing."""
    from lightning_modules.run import training
    from lightning_modules.config.schema import ModelSettings
    from lightning_modules.config.loading import load_config
    from models.backbone import build_backbone
    from models.tiny import TinyConfig

    judge_dir = tmp_path / "judge"
    tiny = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vision_hidden_size=32,
                      vision_heads=2, max_position_embeddings=1024)
    model, processor = build_backbone(OmegaConf.structured(ModelSettings(tiny=tiny)), ["Relevant: Irrelevant: yes"])
    model.save_pretrained(judge_dir)
    processor.save_pretrained(judge_dir)

    run_dir = tmp_path / "run"
    cfg = load_config("configs/experiment/vlguard_sft.yaml", fit_overrides(prepared, run_dir) + [
        "eval.judge=vlm", f"eval.vlm_judge.model.name_or_path={judge_dir}", "eval.vlm_judge.model.dtype=float32",
        "eval.vlm_judge.max_new_tokens=4", "eval.vlm_judge.max_length=1024", "eval.vlm_judge.batch_size=3",
        "eval.vlm_judge.prefilter=false"])
    table = training.run(cfg)
    unsafe = table.loc[["unsafe_clean", "unsafe_attacked"]]
    assert unsafe["ir"].notna().all()
    assert (unsafe[["asr", "ir", "refusal_rate"]].sum(axis=1) - 1).abs().max() < 1e-6
    assert not any("IR is missing" in str(w.message) for w in recwarn)
    verdicts = [json.loads(line) for line in (run_dir / "judge_cache.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    asked = {(r["prompt"], r["response"]) for r in rows if r["subset"].startswith("unsafe") and not r["refusal"]}
    assert asked and asked <= {(v["question"], v["answer"]) for v in verdicts}
    assert {v["judge"] for v in verdicts} == {str(judge_dir)}


def test_query_outcomes_merged_from_shards_equal_one_process():
    """Rows of one query split over ranks (strided like ShardSampler) and merged with the metric's own
    reductions (what the DDP sync applies) give the one-process numbers; a rank may see nothing."""
    rows = [dict(query=q, safe=False, refusal=(q + shot) % 3 == 0, harmful=(q * shot) % 4 == 1, correct=-1,
                 undetermined=False) for q in range(9) for shot in range(3)]
    whole = QueryOutcomes()
    _update(whole, rows)
    shards = [QueryOutcomes() for _ in range(4)]
    for rank, metric in enumerate(shards[:3]):  # rank 3 gets no rows
        _update(metric, rows[rank::3])
    merged = shards[0]
    for other in shards[1:]:
        merged.merge_state(other)
    assert {k: float(v) for k, v in merged.compute().items()} == {k: float(v) for k, v in whole.compute().items()}


@pytest.mark.slow
def test_k_shot_counts_are_identical_on_1_and_2_processes(prepared, tmp_path):
    """The 3-shot attacked set under DDP: a query's rewrites land on different ranks (batch 1,
    strided shards) and are grouped again after the gather. Every run starts from one model, SFT'd
    for 4 steps so that it refuses some rewrites of a query and not others; max_steps=0 keeps it."""
    import subprocess
    import sys

    from lightning_modules.run import training
    from lightning_modules.config.loading import load_config
    from test_bad_inputs import REPO, cli_env

    training.run(load_config("configs/experiment/vlguard_sft.yaml", fit_overrides(prepared, tmp_path / "start") + [
        "trainer.max_steps=4", "optim.lr=1e-3", "eval.test_at_end=false", "eval.val_at_start=false"]))
    results = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"devices{devices}"
        args = [sys.executable, "-m", "lightning_modules.fit", "--config", "configs/experiment/vlguard_sft.yaml",
                *fit_overrides(prepared, run_dir), f"model.name_or_path={tmp_path / 'start' / 'model'}",
                "data.max_eval_samples=5", "trainer.max_steps=0", "eval.judge=keyword", "trainer.accelerator=cpu",
                f"trainer.devices={devices}"] + (["trainer.strategy=ddp"] if devices > 1 else [])
        proc = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads((run_dir / "results.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        attacked = [r for r in rows if r["subset"] == "unsafe_attacked"]
        assert len(attacked) == 15 and len({(r["id"], r["shot"]) for r in attacked}) == 15  # each rewrite once
    assert results[1] == results[2]
    assert results[1]["unsafe_attacked"]["n"] == 5
    # not a trivial comparison: some query has refused and answered rewrites
    by_query = {}
    for r in attacked:
        by_query.setdefault(r["id"], set()).add(r["refusal"])
    assert any(len(v) == 2 for v in by_query.values())


def test_fetch_downloads_and_unzips_into_the_layout_prepare_reads(tmp_path, monkeypatch):
    """The hub stands in for itself with local files: VLGuard's four files, the image folders zipped."""
    import shutil
    import zipfile

    import huggingface_hub

    hub = tmp_path / "hub"
    raw = write_vlguard_raw(tmp_path / "raw", n_train=12, n_test=6)
    hub.mkdir()
    for name in ("train.json", "test.json"):
        shutil.copy(raw / name, hub / name)
    for split in ("train", "test"):
        with zipfile.ZipFile(hub / f"{split}.zip", "w") as zf:
            for path in sorted((raw / split).rglob("*.png")):
                zf.write(path, path.relative_to(raw).as_posix())
    asked = []

    def download(repo_id, filename, repo_type, revision, local_dir):
        asked.append((repo_id, filename, repo_type))
        shutil.copy(hub / filename, Path(local_dir) / filename)
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    out = vlguard.fetch(tmp_path / "fetched")
    assert asked == [("ys-zong/VLGuard", name, "dataset") for name in vlguard.HUB_FILES]
    manifest = vlguard.prepare(out, tmp_path / "prep")
    assert manifest["counts"]["test"]["records"] == 6 and not manifest["dropped"]["train"]

    with zipfile.ZipFile(hub / "train.zip", "w") as zf:  # a member that would escape the folder
        zf.writestr("../evil.txt", "x")
    with pytest.raises(UserError, match="would be written outside"):
        vlguard.fetch(tmp_path / "fetched2")
    assert not (tmp_path / "evil.txt").exists()
