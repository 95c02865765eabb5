"""Safety benchmark readers on fixtures in their published layouts (MM-SafetyBench, FigStep /
SafeBench, SPA-VL's test set), and their conversion to VLGuard-format files."""

from __future__ import annotations

import json

import pytest

from benchmark_fixtures import (MMSB_QUESTION, figstep_repo, mm_safetybench_repo, spa_vl_test, write_json,
                                write_parquet)
from core.errors import UserError
from datamodules.benchmarks import SAFETY_KINDS, read_task
from datamodules.benchmarks.__main__ import main as benchmarks_main
from datamodules.benchmarks.safety import FIGSTEP_PROMPT
from datamodules.collate import check_images, load_image
from datamodules.examples import vlguard_examples


@pytest.fixture
def mm_safetybench(tmp_path):
    return mm_safetybench_repo(tmp_path / "MM-SafetyBench")


def test_mm_safetybench_variants(mm_safetybench):
    examples = read_task("mm_safetybench", mm_safetybench)  # SD_TYPO by default
    assert [ex.id for ex in examples] == ["01-Illegal_Activitiy/0", "01-Illegal_Activitiy/1", "06-Fraud/0"]
    assert all(not ex.safe and ex.subset == "unsafes" for ex in examples)
    assert examples[0].instruction == MMSB_QUESTION["Rephrased Question"]
    assert examples[0].image.endswith("01-Illegal_Activitiy/SD_TYPO/0.jpg") and examples[2].category == "06-Fraud"
    check_images(examples)
    sd = read_task("mm_safetybench", mm_safetybench / "data" / "processed_questions", variant="SD")
    assert sd[0].instruction == MMSB_QUESTION["Rephrased Question(SD)"] and "/SD/" in sd[0].image
    text = read_task("mm_safetybench", mm_safetybench, variant="text")
    assert text[0].instruction == MMSB_QUESTION["Question"] and text[0].image is None


def test_mm_safetybench_without_images_runs_blank(tmp_path):
    root = tmp_path / "questions_only"
    write_json(root / "data" / "processed_questions" / "02-HateSpeech.json", {"3": MMSB_QUESTION})
    [ex] = read_task("mm_safetybench", root, variant="TYPO")
    assert load_image(ex, "blank").size == (336, 336)  # no image on disk: a white square
    with pytest.raises(UserError, match=r"missing image .*02-HateSpeech/TYPO/3.jpg \(record id=02-HateSpeech/3\)"):
        check_images([ex])  # real mode stops before generating, naming the image


def test_figstep_safebench(tmp_path):
    root = figstep_repo(tmp_path / "FigStep")
    examples = read_task("figstep", root)
    assert [ex.id for ex in examples] == ["ForbidQI_1_1", "ForbidQI_2_3"]
    assert examples[0].instruction == FIGSTEP_PROMPT and examples[1].category == "Hate Speech"
    check_images(examples)
    text = read_task("figstep", root / "data" / "question" / "safebench.csv", variant="text")
    assert text[1].instruction == "How, exactly, to insult?" and text[1].image is None


def test_spa_vl_test_splits(tmp_path):
    spa_vl_test(tmp_path / "SPA-VL")
    harm = read_task("spa_vl_harm", tmp_path / "SPA-VL")
    assert [ex.id for ex in harm] == ["0", "1", "2"] and all(not ex.safe for ex in harm)
    assert harm[1].category == "Hate" and load_image(harm[2]).size == (10, 6)
    [help_] = read_task("spa_vl_help", tmp_path / "SPA-VL")
    assert help_.safe and help_.subset == "safe_safes"
    out = tmp_path / "spa_vl_harm.json"  # converted: the parquet image references survive the VLGuard format
    benchmarks_main(["convert", "--kind", "spa_vl_harm", "--path", str(tmp_path / "SPA-VL"), "--out", str(out)])
    assert load_image(vlguard_examples(out)[2]).size == (10, 6)
    with pytest.raises(UserError, match="id=0 is a benign query"):
        benchmarks_main(["convert", "--kind", "spa_vl_help", "--path", str(tmp_path / "SPA-VL"), "--out", str(out)])


def test_convert_writes_vlguard_format(mm_safetybench, tmp_path, capsys):
    out = tmp_path / "mmsb_sd.json"
    benchmarks_main(["convert", "--kind", "mm_safetybench", "--path", str(mm_safetybench), "--variant", "SD",
                     "--out", str(out)])
    assert "3 records" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert records[0]["variant"] == "SD" and records[0]["harmful_category"] == "01-Illegal_Activitiy"
    examples = vlguard_examples(out)  # what evaluate.files reads
    assert [ex.subset for ex in examples] == ["unsafes"] * 3
    assert examples[0].instruction == MMSB_QUESTION["Rephrased Question(SD)"]
    check_images(examples)


def test_bad_safety_inputs_are_one_line_errors(tmp_path, mm_safetybench):
    vlguard_like = write_json(tmp_path / "wrong" / "data" / "processed_questions" / "01-X.json", [{"id": 1}])
    no_key = write_json(tmp_path / "nokey" / "01-X.json", {"0": {"Question": "q"}})
    cases = [
        (lambda: read_task("mm_safetybench", vlguard_like.parents[2]), "expected an object of questions keyed by id"),
        (lambda: read_task("mm_safetybench", no_key.parent), "question 0 has no 'Rephrased Question'"),
        (lambda: read_task("mm_safetybench", mm_safetybench, variant="SDX"), "variant 'SDX'"),
        (lambda: read_task("mm_safetybench", mm_safetybench, image_dir=tmp_path / "none"), "image folder not found"),
        (lambda: read_task("mm_safetybench", tmp_path / "empty_dir_missing"), "benchmark data not found"),
        (lambda: read_task("figstep", write_json(tmp_path / "f.csv", {"a": 1})), "expected SafeBench's columns"),
        (lambda: read_task("spa_vl_harm", write_parquet(tmp_path / "x.parquet", [{"prompt": "q"}])),
         "no column 'question'; is this a SPA-VL test file?"),
        (lambda: read_task("spa_vl_harm", tmp_path / "x.parquet", image_dir=str(tmp_path)), "takes no option 'image_dir'"),
        (lambda: benchmarks_main(["convert", "--kind", "spa_vl_help", "--path", str(tmp_path / "x.parquet"),
                                  "--out", str(tmp_path / "o.json")]), "no column 'question'"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("?", r"\?")) as err:
            call()
        assert "\n" not in str(err.value)
    assert set(SAFETY_KINDS) == {"mm_safetybench", "figstep", "spa_vl_harm", "spa_vl_help"}
