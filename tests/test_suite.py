"""The one-word attack on any benchmark inside a suite (cues mined on the training set, attack files
in the task folder, evaluated with the gaps) and the evaluation suite (configs/evaluate/suite_tiny.yaml) on a
tiny model: results.csv's task column, resume per task, models side by side, bad inputs in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import lightning_modules.analysis.predict as predict
from attack_fixture import write_json
from suite_fixture import UTILITY, suite_data
from core.errors import UserError
from lightning_modules.evaluate import evaluate
from lightning_modules.analysis.suite_models import model_config
from lightning_modules.config.loading import load_config
from lightning_modules.config.schema import SuiteModel
from models.backbone import build_backbone

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "configs/evaluate/suite_tiny.yaml"
TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "model.tiny.vision_hidden_size=32", "model.tiny.vision_layers=1",
        "model.tiny.vision_heads=2", "model.tiny.image_size=16", "model.tiny.patch_size=8"]
SAFETY = ("mm_safetybench", "figstep", "spa_vl_harm")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path):
    """The tiny suite's files (tests/suite_fixture.py), a run directory and the temporary folder."""
    return dict(paths=suite_data(tmp_path), run_dir=tmp_path / "run", tmp=tmp_path)


def overrides(data, *extra):
    return [*(f"evaluate.benchmarks.{k}={v}" for k, v in data["paths"].items()), f"run_dir={data['run_dir']}",
            "eval.max_new_tokens=4", "data.eval_batch_size=8", *TINY, *extra]


def scripted(examples) -> list[str]:
    """A model with the mirage: refuses unsafe queries unless they open with "What", answers benign
    ones unless they open with "Share"; gold answers on utility questions."""
    out = []
    for ex in examples:
        if ex.subset == "utility":
            out.append(str(ex.answer))
        elif ex.instruction.startswith("What") and not ex.safe:
            out.append("Sure, here are the steps.")
        elif ex.instruction.startswith("Share") or not ex.safe:
            out.append("I'm sorry, I cannot help with that.")
        else:
            out.append("There are two cats.")
    return out


def test_mined_attack_evaluated_with_both_gaps(data, monkeypatch):
    """Cue mining + rewrite + evaluate on the fixture benchmark: the scripted mirage shows as a
    mirage gap of +100 points (ASR) and an over-prudence gap of +100 points (refusal rate)."""
    monkeypatch.setattr(predict, "greedy_generate", lambda model, processor, batch, *a, **k: scripted(batch["examples"]))
    cfg = load_config(SUITE, overrides(data))
    cfg.evaluate.tasks = cfg.evaluate.tasks[:1]
    table = evaluate(cfg).set_index(["set", "subset", "shot", "category"])
    assert table.loc[("test", "unsafes", "single", "all"), "asr"] == 0
    assert table.loc[("test_what_3shot", "unsafes", "any-of-3", "all"), "asr"] == 1
    assert table.loc[("test_share_1shot", "safe_safes", "single", "all"), "refusal_rate"] == 1
    assert table.loc[("mirage_gap", "gap", "", "all"), "gap"] == 1
    assert table.loc[("overprudence_gap", "gap", "", "all"), "gap"] == 1
    saved = pd.read_csv(data["run_dir"] / "results.csv")
    assert set(saved["task"]) == {"vlguard"}
    assert (data["run_dir"] / "tasks" / "vlguard" / "data" / "test_what_3shot.json").is_file()


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_one_model_build_per_suite(data, monkeypatch):
    """The model is built once for every task, never for a finished suite; resuming an interrupted
    task builds it again with the same tokenizer (trained on every task's texts, not the ones left)."""
    builds = []

    def counted(*args, **kwargs):
        model, processor = build_backbone(*args, **kwargs)
        builds.append(len(processor.tokenizer))
        return model, processor

    monkeypatch.setattr(predict, "build_backbone", counted)
    monkeypatch.setattr(predict, "greedy_generate", lambda model, processor, batch, *a, **k: scripted(batch["examples"]))
    evaluate(load_config(SUITE, overrides(data)))
    first = (data["run_dir"] / "results.csv").read_text()
    assert len(builds) == 1 and first.count("\ntextvqa,") == 1
    evaluate(load_config(SUITE, overrides(data)))
    assert len(builds) == 1  # every task finished: read back, no model loaded
    samples = data["run_dir"] / "tasks" / "pope" / "samples.jsonl"
    samples.write_text(samples.read_text().splitlines(keepends=True)[0])  # pope interrupted after one answer
    (data["run_dir"] / "tasks" / "pope" / "task.json").unlink()
    evaluate(load_config(SUITE, overrides(data)))
    assert builds[1:] == builds[:1] and (data["run_dir"] / "results.csv").read_text() == first


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_one_vlm_judge_per_suite(data, monkeypatch):
    """evaluate.judge.name=vlm: one judge model for every safety task of the suite, loaded when the
    first answer needs judging; a finished suite loads none."""
    from metrics.vlm_judge import DEFAULT_JUDGE_MODEL, IRRELEVANT, Judgement, VLMJudge

    loads, judged = [], []

    class FakeVLMJudge:
        def __call__(self, items):
            judged.extend(items)
            return [Judgement(IRRELEVANT, "Irrelevant: no.", "model") for _ in items]

    monkeypatch.setattr(VLMJudge, "from_judge_settings", classmethod(lambda cls, *a, **k: loads.append(k) or FakeVLMJudge()))
    monkeypatch.setattr(predict, "greedy_generate", lambda model, processor, batch, *a, **k: scripted(batch["examples"]))
    cfg = load_config(SUITE, overrides(data, "evaluate.judge.name=vlm", "evaluate.judge.prefilter=false"))
    evaluate(cfg)
    assert len(loads) == 1 and judged and loads[0]["default_cache"] == data["run_dir"] / "judge_cache.jsonl"
    tasks = {p.parent.name for p in (data["run_dir"] / "tasks").glob("*/samples.jsonl")
             if any(json.loads(line).get("judge") == DEFAULT_JUDGE_MODEL
                    for line in p.read_text().splitlines())}
    assert len(tasks) >= 2  # one judge model judged several tasks
    evaluate(load_config(SUITE, overrides(data, "evaluate.judge.name=vlm", "evaluate.judge.prefilter=false")))
    assert len(loads) == 1  # finished: nothing judged again, no judge loaded


@pytest.mark.slow
def test_suite_tiny_end_to_end_resumes_per_task(data, monkeypatch):
    cfg = load_config(SUITE, overrides(data))
    evaluate(cfg)
    table = pd.read_csv(data["run_dir"] / "results.csv")
    assert list(dict.fromkeys(table["task"])) == ["vlguard", *SAFETY, *UTILITY]
    head = table[table["headline"] & (table["category"] == "all")].set_index("task")
    assert 0 <= head.loc["textvqa", "vqa_accuracy"] <= 1 and 0 <= head.loc["scienceqa_img", "accuracy"] <= 1
    for task in SAFETY:  # the converted benchmarks, clean and attacked, with the mirage gap
        assert {"clean", "attacked", "gap"} <= set(table.loc[table["task"] == task, "role"])
    generated = []
    monkeypatch.setattr(predict, "greedy_generate", lambda m, p, batch, *a, **k: generated.extend(batch["examples"]))
    (data["run_dir"] / "tasks" / "pope" / "task.json").unlink()  # as if pope was interrupted after generating
    evaluate(load_config(SUITE, overrides(data)))
    assert generated == []  # finished tasks read back; pope's answers are in its samples.jsonl
    pd.testing.assert_frame_equal(pd.read_csv(data["run_dir"] / "results.csv"), table)


@pytest.mark.slow
def test_models_side_by_side_table_and_figure(data, monkeypatch):
    monkeypatch.setattr(predict, "greedy_generate", lambda model, processor, batch, *a, **k: scripted(batch["examples"]))
    models = "evaluate.models=[{name: base, name_or_path: tiny}, {name: other_seed, name_or_path: tiny}]"
    cfg = load_config(SUITE, overrides(data, models))
    table = evaluate(cfg)
    assert list(dict.fromkeys(table["model"])) == ["base", "other_seed"]
    report = (data["run_dir"] / "results.md").read_text()
    assert "| base | 0.00 [0.0, 0.0] | " in report and "### textvqa (textvqa)" in report
    assert (data["run_dir"] / "tradeoff.png").stat().st_size > 0
    assert (data["run_dir"] / "models" / "other_seed" / "results.csv").is_file()


@pytest.fixture
def saved_models(tmp_path):
    """A tiny LLaVA as fit leaves models: a save_pretrained directory, a fit checkpoint of its weights
    and a LoRA adapter directory whose adapter_config.json names that directory as its base."""
    from peft import LoraConfig, get_peft_model

    from models.backbone import build_tiny
    from models.tiny import TinyConfig

    sizes = dict(item.split("=") for item in TINY)
    model, processor = build_tiny(TinyConfig(**{k.split(".")[-1]: int(v) for k, v in sizes.items()}),
                                  ["Is there a dog in the image ? What brand is it yes no"])
    base = tmp_path / "models" / "base"
    model.eval().save_pretrained(base)
    processor.save_pretrained(base)
    ckpt = tmp_path / "models" / "rmu" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0}, ckpt)
    adapter = tmp_path / "models" / "npo_lora"
    get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)")).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    write_json(adapter / "adapter_config.json", {**config, "base_model_name_or_path": str(base)})
    return dict(base=base, ckpt=ckpt, adapter=adapter)


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_model_entries_by_what_their_path_holds(data, saved_models, monkeypatch):
    """A save_pretrained directory, a LoRA adapter (onto the base its adapter_config names), a fit
    checkpoint (into name_or_path) and a finished suite's folder (read: no model built)."""
    builds = []

    def counted(model_cfg, *args, **kwargs):
        builds.append((model_cfg.name_or_path, model_cfg.finetune, model_cfg.adapter_path))
        return build_backbone(model_cfg, *args, **kwargs)

    loaded, load = [], predict.load_fit_checkpoint
    monkeypatch.setattr(predict, "build_backbone", counted)
    monkeypatch.setattr(predict, "load_fit_checkpoint", lambda model, path: loaded.append(path) or load(model, path))
    base, ckpt, adapter = (str(saved_models[k]) for k in ("base", "ckpt", "adapter"))

    def two_tasks(*extra):  # scienceqa_img and pope
        cfg = load_config(SUITE, overrides(data, *extra))
        cfg.evaluate.tasks = cfg.evaluate.tasks[5:7]
        return cfg

    entries = f"evaluate.models=[{{name: base, path: {base}}}, {{name: npo, path: {adapter}}}, " \
              f"{{name: rmu, path: {ckpt}, name_or_path: {base}}}]"
    evaluate(two_tasks(entries))
    assert builds == [(base, "full", None), (base, "lora", adapter), (base, "full", None)] and loaded == [ckpt]
    first = pd.read_csv(data["run_dir"] / "results.csv")
    assert list(dict.fromkeys(first["model"])) == ["base", "npo", "rmu"]
    again = f"evaluate.models=[{{name: base, path: {data['run_dir'] / 'models' / 'base'}}}]"
    table = evaluate(two_tasks(again, f"run_dir={data['tmp'] / 'read'}"))
    assert len(builds) == 3  # read back, nothing built
    pd.testing.assert_frame_equal(table.reset_index(drop=True), first[first["model"] == "base"].reset_index(drop=True),
                                  check_dtype=False)
    # a fit run directory (its test results.csv has no task column) stands for its exported model/
    import shutil

    fit_run = data["tmp"] / "fit_run"
    shutil.copytree(base, fit_run / "model")
    (fit_run / "results.csv").write_text("eval_set,asr,n\nunsafe_clean,0.5,2\n")
    evaluate(two_tasks(f"evaluate.models=[{{name: fit, path: {fit_run}}}]", f"run_dir={data['tmp'] / 'fit'}"))
    assert builds[-1] == (str(fit_run / "model"), "full", None) and len(builds) == 4
    cfg = load_config(SUITE, overrides(data))  # the defaults: a checkpoint into model.name_or_path; a base given wins
    assert model_config(cfg, SuiteModel(name="r", path=ckpt), "checkpoint").model.name_or_path == "tiny"
    sub = model_config(cfg, SuiteModel(name="n", path=adapter, name_or_path="org/base"), "adapter")
    assert (sub.model.name_or_path, sub.model.finetune, sub.model.adapter_path) == ("org/base", "lora", adapter)


@pytest.mark.parametrize("entry, message", [
    ("{name: x, path: NOWHERE}", r"evaluate.models 'x': path .*NOWHERE not found: expected a LoRA adapter directory"),
    ("{name: x, path: EMPTY}", r"evaluate.models 'x': path .*EMPTY is not a LoRA adapter directory"),
    ("{name: x}", "evaluate.models 'x': give name_or_path"),
    ("{name: x, path: CKPT, checkpoint: CKPT}", "replaces adapter_path and checkpoint"),
    ("{name: x, path: NOBASE}", "names no base_model_name_or_path: give the base as the entry's name_or_path"),
    ("{name: x, path: PARTIAL}", r"results.csv has no rows for task 'vlguard': run the suite there first"),
])
def test_bad_model_entries_are_one_line(data, entry, message):
    tmp = data["tmp"]
    (tmp / "EMPTY").mkdir()
    torch.save({"state_dict": {}}, tmp / "CKPT.ckpt")
    write_json(tmp / "NOBASE" / "adapter_config.json", {"peft_type": "LORA"})
    write_json(tmp / "PARTIAL" / "tasks.json", {})
    (tmp / "PARTIAL" / "results.csv").write_text("task,set\npope,pope\n")
    entry = entry.replace("CKPT", str(tmp / "CKPT.ckpt"))
    for name in ("NOWHERE", "EMPTY", "NOBASE", "PARTIAL"):
        entry = entry.replace(name, str(tmp / name))
    with pytest.raises(UserError, match=message) as err:
        evaluate(load_config(SUITE, overrides(data, f"evaluate.models=[{entry}]")))
    assert "\n" not in str(err.value)
    assert not (data["run_dir"] / "models").exists()


@pytest.mark.parametrize("changes, setup, message", [
    ({"tasks.2.kind": "textvqa2"}, None, r"unknown evaluate.tasks\[2\].kind 'textvqa2'"),
    ({"tasks.4.attack": {"train": "x.json"}}, None, "attack is for safety tasks"),
    ({"tasks.1.image_dir": "/nonexistent/imgs"}, None, "image folder not found"),
    ({"tasks.1.image_dir": "IMGS"}, "imgs", "missing image"),
    ({}, "llava_test", r"test.json: record 0 \(id 1\) has no 'instr-resp'"),
    ({"files": [{"name": "a", "path": "x.json"}]}, None, "replaces evaluate.files"),
    ({"tasks.1.options": {"varient": "SD"}}, None, "kind mm_safetybench takes no option 'varient'; options: variant"),
    ({"tasks.0.attack.judge_protocol": "mine"}, None, "unknown judge protocol 'mine'"),
])
def test_bad_suite_inputs_are_one_line(data, changes, setup, message):
    extra = []
    if setup == "imgs":  # an image folder without the pictures, in real image mode
        (data["tmp"] / "IMGS").mkdir()
        changes = {"tasks.1.image_dir": str(data["tmp"] / "IMGS")}
        extra = ["data.image_mode=real"]
    if setup == "llava_test":  # LLaVA conversations where a VLGuard-format test file is expected
        write_json(data["paths"]["vlguard_test"], [{"id": 1, "image": "a.png", "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    cfg = load_config(SUITE, overrides(data, *extra))
    for key, value in changes.items():
        OmegaConf.update(cfg, f"evaluate.{key}", value, merge=False)
    with pytest.raises(UserError, match=message) as err:
        evaluate(cfg)
    assert "\n" not in str(err.value)
    assert not (data["run_dir"] / "results.csv").exists()


@pytest.mark.slow  # trains, generates or runs the command end to end
def test_cli_missing_benchmark_path_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lightning_modules.evaluate", "--config", str(SUITE)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert "evaluate.benchmarks" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_suite_paper_lists_the_papers_benchmarks(tmp_path):
    from lightning_modules.analysis.evaluation import read_settings
    from lightning_modules.config.loading import _compose

    path = REPO / "configs/evaluate/suite_paper.yaml"
    missing = sorted(k for k in OmegaConf.missing_keys(_compose(path)) if "[" not in k)
    settings = read_settings(load_config(path, [f"{k}={tmp_path}/{k}" for k in missing]))
    kinds = {t.kind for t in settings.tasks}
    assert kinds == {"vlguard", "mm_safetybench", "figstep", "spa_vl_harm", "vqav2", "textvqa", "scienceqa_img",
                     "mmbench", "pope", "mme"}
    assert all(t.attack and t.attack.train.endswith("vlguard_train") for t in settings.tasks
               if t.kind in ("vlguard", "mm_safetybench", "figstep", "spa_vl_harm"))
