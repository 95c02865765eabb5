"""Bad inputs to the benchmark scorer's CLI (`python -m metrics.benchmark_scores`) and to the judge
protocol setting: each one line naming the file, question or key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark_fixtures import (MMBENCH_DEV, llava_mme_questions, llava_scienceqa_answers, mme_release, pope_release,
                                scienceqa_release, write_jsonl, write_parquet)
from core.errors import cli_main
from omegaconf import OmegaConf

from core.errors import UserError
from lightning_modules.config.loading import _compose, load_config
from metrics.benchmark_scores import main as score_main

SUITE = Path(__file__).resolve().parents[1] / "configs/evaluate/suite_tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    mme = mme_release(root / "MME")
    (root / "MME" / "artwork" / "questions_answers_YN" / "10002.txt").unlink()
    return dict(
        sqa=scienceqa_release(root / "sqa"),
        sqa_answers=llava_scienceqa_answers(root / "sqa_answers.jsonl", {"4": "B", "7": "A"}),
        mme=mme, mme_q=llava_mme_questions(root / "llava_mme.jsonl"),
        mme_odd=write_jsonl(root / "odd.jsonl", [{"question_id": "existence/000000006040.jpg", "text": "Is it?"}]),
        mme_answers=write_jsonl(root / "mme_answers.jsonl", [{"text": "yes"}]),
        pope=pope_release(root / "POPE"),
        copies=write_parquet(root / "MMB" / "dev.parquet", MMBENCH_DEV[2:]),
        bad_index=write_parquet(root / "MMB2" / "dev.parquet", [{**MMBENCH_DEV[0], "index": "x7"}]),
        answers=write_jsonl(root / "answers.jsonl", [{"question_id": 1, "text": "yes"}]),
        copy_answers=write_jsonl(root / "copy_answers.jsonl", [{"question_id": r["index"], "text": "A"}
                                                               for r in MMBENCH_DEV[2:]]),
        no_text=write_jsonl(root / "no_text.jsonl", [{"question_id": 1, "answer": "yes"}]))


CASES = [
    (["scienceqa_img", "{sqa}", "--answers", "{sqa_answers}"], "no answer to question_id '9'"),
    (["mme", "{mme_odd}", "--annotations", "{mme}", "--answers", "{mme_answers}"],
     "line 1: question 'Is it?' is not among the questions of"),
    (["mme", "{mme_q}", "--annotations", "{mme}", "--answers", "{mme_answers}"], "no MME answer file"),
    (["pope", "{pope}", "--split", "Half", "--answers", "{answers}"], "no .parquet files with 'Half' in their path"),
    (["mmbench", "{copies}", "--answers", "{copy_answers}"], "mmbench: no original questions (index < 1000000)"),
    (["mmbench", "{bad_index}", "--answers", "{answers}"], "'index' is 'x7', not an integer"),
    (["pope", "{pope}", "--answers", "{no_text}"], "line 1 has no 'text' answer"),
    (["pope", "{pope}", "--answers", "{answers}"], "no answer to question_id '2'"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[c[1][:40] for c in CASES])
def test_scorer_cli_bad_input_is_one_line(data, argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(score_main)([a.format(**data) for a in argv])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and message in err and "\n" not in err and "Traceback" not in err


def test_judge_protocol_setting_names_the_choices(tmp_path):
    missing = sorted(k for k in OmegaConf.missing_keys(_compose(SUITE)) if "[" not in k)
    with pytest.raises(UserError, match="mm_safetybench") as err:
        load_config(SUITE, [f"{k}={tmp_path}/{k}" for k in missing] + ["evaluate.judge.protocol=mmsb"])
    assert "\n" not in str(err.value)
