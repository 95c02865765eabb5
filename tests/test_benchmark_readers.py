"""Utility benchmark readers on small fixtures in their real formats (lmms-lab parquet releases and
LLaVA's evaluation files), images decoded lazily, scored by score_task."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from benchmark_fixtures import (llava_mme_questions, llava_scienceqa_answers, lmms_lab_releases, mme_release, save_image,
                                scienceqa_release, vqa_answers, write_json, write_jsonl)
from core.errors import UserError
from core.parquet_images import parse_ref
from datamodules.benchmarks import TASK_KINDS, UTILITY_KINDS, read_task
from datamodules.benchmarks.prompts import MC_PROMPT, SHORT_ANSWER
from datamodules.collate import check_images, load_image
from metrics.benchmark_scores import example_scores, score_task
from metrics.benchmark_scores import main as score_main


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    return lmms_lab_releases(tmp_path_factory.mktemp("lmms_lab"))


def test_every_utility_kind_reads_its_parquet_release(releases):
    assert set(releases) == set(UTILITY_KINDS)
    for kind, path in releases.items():
        examples = read_task(kind, path.parent)  # a folder of parquet files, as a download leaves it
        assert examples and all(ex.safe and ex.subset == "utility" and ex.answer for ex in examples), kind
        assert all(parse_ref(ex.image) for ex in examples), kind  # images stay in the file until needed


def test_parquet_images_decode_lazily_across_row_groups(releases):
    examples = read_task("vqav2", releases["vqav2"])
    check_images(examples)  # header reads through the references
    sizes = [load_image(ex).size for ex in examples]
    assert sizes == [(8, 6), (9, 6), (10, 6)]  # row 2 sits in the second row group
    assert load_image(examples[0], "blank").size == (8, 6)


def test_vqav2_records_and_scores(releases):
    examples = read_task("vqav2", releases["vqav2"])
    assert examples[0].instruction == f"How many dogs?\n{SHORT_ANSWER}"
    assert examples[0].answer == "2" and len(examples[0].extra["answers"]) == 10
    assert [ex.category for ex in examples] == ["number", "other", "yes/no"]
    # "Two" matches 9 humans' "2" after normalisation (1.0); "red" matches 2 of 10 (0.6); "yes" 0
    assert example_scores("vqav2", examples, ["Two", "Red.", "yes"]) == pytest.approx([1.0, 0.6, 0.0])
    rows = score_task("vqav2", examples, ["Two", "Red.", "yes"])
    assert rows["all"] == pytest.approx({"vqa_accuracy": 1.6 / 3})
    assert rows["other"] == pytest.approx({"vqa_accuracy": 0.6})


def test_pope_release_reads_its_default_configuration_once(releases):
    root = releases["pope"].parent.parent  # POPE/: data/ and Full/ hold the same questions
    pope = read_task("pope", root)
    assert len(pope) == 6 and len({ex.id for ex in pope}) == 6
    full = read_task("pope", root, split="Full")
    assert len(full) == 6 and sorted(ex.id for ex in full) == sorted(ex.id for ex in pope)
    rows = score_task("pope", pope, ["yes"] * 6)
    assert rows["all"]["accuracy"] == 0.5 and rows["all"]["f1_mean"] == pytest.approx(2 / 3)


def test_textvqa_gives_ocr_tokens_and_normalises_every_answer(releases):
    [ex] = read_task("textvqa", releases["textvqa"])
    # lmms-lab's lower-case question capitalised (lmms-eval textvqa/utils.py:54)
    assert ex.instruction == f"What brand is it?\nReference OCR token: NIKE, just\n{SHORT_ANSWER}"
    assert read_task("textvqa", releases["textvqa"], ocr=False)[0].instruction == f"What brand is it?\n{SHORT_ANSWER}"
    assert score_task("textvqa", [ex], ["NIKE"])["all"]["vqa_accuracy"] == 1.0


def test_multiple_choice_records_and_scores(releases):
    sqa = read_task("scienceqa_img", releases["scienceqa_img"])
    assert sqa[0].instruction == f"Context: Look at the animals.\nWhich is a mammal?\nA. shark\nB. whale\nC. trout\n{MC_PROMPT}"
    assert sqa[1].instruction.startswith("Which is hot?")  # an empty hint gives no context line
    assert [ex.answer for ex in sqa] == ["B", "B"]
    rows = score_task("scienceqa_img", sqa, ["The answer is B.", "fire"])  # LLaVA's rule reads no option text
    assert rows["all"] == {"accuracy": 0.5, "extracted": 0.5}


def test_mmbench_release_with_circular_copies(releases):
    mmb = read_task("mmbench", releases["mmbench"])
    assert [ex.id for ex in mmb] == ["101", "102", "1000101", "1000102", "2000101"]
    assert mmb[0].extra["options"] == {"A": "a cat", "B": "a dog", "C": "a bird"}  # D is empty
    assert [ex.extra["group"] for ex in mmb] == ["101", "102", "101", "102", "101"]
    # question 101 right in 2 of its 3 rotations, 102 in both: CircularEval 1/2, the originals 2/2
    answers = ["B", "A", "A", "B", "A"]
    rows = score_task("mmbench", mmb, answers)
    assert rows["all"] == pytest.approx({"accuracy": 0.5, "accuracy_single": 1.0, "extracted": 1.0})
    assert rows["image_scene"]["accuracy"] == 0.0 and rows["color"]["accuracy"] == 1.0
    assert score_task("mmbench", mmb, ["B", "A", "A", "B", "C"])["all"]["accuracy"] == 1.0
    # a seeded sample keeps a question with its copies
    from lightning_modules.analysis.suite import sample_groups
    kept = sample_groups(mmb, 1, seed=0)
    assert len({ex.extra["group"] for ex in kept}) == 1 and len(kept) in (2, 3)


def test_yes_no_records_and_scores(releases):
    pope = read_task("pope", releases["pope"])
    assert pope[0].instruction == f"Is there a dog in the image?\n{SHORT_ANSWER}"
    rows = score_task("pope", pope, ["Yes, there is.", "No", "yes", "no", "yes", "no"])
    assert rows["all"]["accuracy"] == 1.0 and rows["all"]["f1_mean"] == 1.0
    assert set(rows) == {"all", "adversarial", "popular", "random"}
    mme = read_task("mme", releases["mme"])
    assert [ex.id for ex in mme] == ["code_reasoning/0020.png#1", "code_reasoning/0020.png#2"]
    # lmms-eval's default prompt (mme/utils.py:37-45): " Please answer yes or no." -> "\n" + SHORT_ANSWER
    assert [ex.instruction for ex in mme] == [f"Is the output 5?\n{SHORT_ANSWER}", f"Is the output 6? \n{SHORT_ANSWER}"]
    rows = score_task("mme", mme, ["Yes", "Yes"])
    assert rows["code_reasoning"] == pytest.approx({"accuracy": 0.5, "accuracy_plus": 0.0, "score": 50.0})
    assert rows["all"]["cognition_score"] == 50.0


def test_llava_evaluation_files(tmp_path):
    img = save_image(tmp_path / "images" / "COCO_1.jpg")
    q = write_jsonl(tmp_path / "vqav2.jsonl", [{"question_id": 5, "image": img.name, "category": "default",
                                                "text": f"How many?\n{SHORT_ANSWER}"}])
    ann = write_json(tmp_path / "ann.json", {"annotations": [
        {"question_id": 5, "answers": vqa_answers(("3", 10)), "answer_type": "number"}]})
    [ex] = read_task("vqav2", q, tmp_path / "images", annotations=str(ann))
    assert ex.image == str(img) and ex.instruction == f"How many?\n{SHORT_ANSWER}"
    assert score_task("vqav2", [ex], ["three"])["all"]["vqa_accuracy"] == 1.0

    tq = write_jsonl(tmp_path / "textvqa.jsonl", [{"question_id": "img9", "image": img.name,
                     "text": f"what is written?\nReference OCR token: STOP\n{SHORT_ANSWER}"}])
    tann = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 44, "image_id": "img9", "question": "What is written?", "answers": ["stop"] * 10}]})
    assert read_task("textvqa", tq, tmp_path / "images", annotations=str(tann))[0].extra["answers"] == ["stop"] * 10

    pq_ = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 1, "image": img.name, "text": "Is there a dog?", "category": "popular"},
        {"question_id": 2, "image": img.name, "text": "Is there a cat?", "category": "popular"}])
    write_jsonl(tmp_path / "coco" / "coco_pope_popular.json", [{"question_id": 1, "label": "yes"},
                                                                {"question_id": 2, "label": "no"}])
    assert [ex.answer for ex in read_task("pope", pq_, annotations=str(tmp_path / "coco"))] == ["yes", "no"]

    mq = write_jsonl(tmp_path / "llava_mme.jsonl", [
        {"question_id": "OCR/1.jpg", "image": "OCR/1.jpg", "text": "Is it A? Please answer yes or no.", "category": "OCR"}])
    (tmp_path / "MME" / "OCR").mkdir(parents=True)
    (tmp_path / "MME" / "OCR" / "1.txt").write_text("Is it A? Please answer yes or no.\tYes\n")
    [mme] = read_task("mme", mq, annotations=str(tmp_path / "MME"))
    assert mme.answer == "yes" and mme.extra["image_key"] == "OCR/1.jpg"


def test_llava_mme_question_file_in_its_real_text(tmp_path, capsys):
    root = mme_release(tmp_path / "MME_Benchmark_release_version")
    questions = llava_mme_questions(tmp_path / "llava_mme.jsonl")
    mme = read_task("mme", questions, root, annotations=str(root))
    assert [ex.answer for ex in mme] == ["yes", "no", "yes", "no"]  # the double-space question found too
    assert mme[0].instruction == f"Is there a train in this image?\n{SHORT_ANSWER}"  # what LLaVA asks
    assert [ex.extra["image_key"] for ex in mme[::2]] == ["existence/000000006040.jpg", "artwork/10002.jpg"]
    assert load_image(mme[0]).size == (10, 8)
    # LLaVA's answers file: model_vqa_loader writes {question_id, prompt, text}, two lines per image
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": ex.extra["image_key"], "prompt": ex.instruction,
                                                        "text": t} for ex, t in zip(mme, ["Yes", "No", "Yes", "Yes"])])
    score_main(["mme", str(questions), "--annotations", str(root), "--answers", str(answers)])
    out = capsys.readouterr().out
    assert "| existence |     1.0000 |" in out and "| artwork   |     0.5000 |" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": "artwork/10002.jpg", "category": "artwork",
                                                "text": "Is this by Nobody?\nAnswer the question using a single word or phrase."}])
    with pytest.raises(UserError, match=r"line 1: question .* is not among the questions of .*10002.txt"):
        read_task("mme", bad, annotations=str(root))


def test_scienceqa_llava_answers_for_every_test_problem(tmp_path, capsys):
    root = scienceqa_release(tmp_path / "scienceqa")
    sqa = read_task("scienceqa_img", root)
    assert [ex.id for ex in sqa] == ["4", "9"]  # the test problems with an image
    # LLaVA answers all test problems (4,241 in the real file), in any order; the image ones are scored
    answers = llava_scienceqa_answers(tmp_path / "answers.jsonl", {"9": "A", "7": "B", "4": "The answer is B."})
    score_main(["scienceqa_img", str(root), "--answers", str(answers)])
    assert re.search(r"\| all +\| +0.5000 \| +1.0000 \|", capsys.readouterr().out)
    missing = llava_scienceqa_answers(tmp_path / "missing.jsonl", {"4": "B", "7": "B"})
    with pytest.raises(UserError, match="no answer to question_id '9'; 2 answers for 2 questions"):
        score_main(["scienceqa_img", str(root), "--answers", str(missing)])


def test_scienceqa_release_folder(tmp_path):
    write_json(tmp_path / "problems.json", {
        "10": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "", "image": "image.png",
               "subject": "physics"},
        "11": {"question": "No picture here", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None}})
    write_json(tmp_path / "pid_splits.json", {"test": ["10", "11"], "val": []})
    save_image(tmp_path / "images" / "test" / "10" / "image.png")
    [ex] = read_task("scienceqa_img", tmp_path)  # problem 11 has no image: not in ScienceQA-IMG
    assert ex.answer == "B" and load_image(ex).size == (10, 8)


def test_bad_utility_inputs_are_one_line_errors(tmp_path, releases):
    cases = [
        (lambda: read_task("vqa", releases["vqav2"]), "unknown benchmark kind 'vqa'"),
        (lambda: read_task("vqav2", tmp_path / "nope"), "benchmark data not found"),
        (lambda: read_task("mmbench", releases["vqav2"]), "no column 'index'; is this a MMBench file?"),
        (lambda: read_task("vqav2", releases["vqav2"], variant="SD"), "takes no option 'variant'"),
        (lambda: read_task("vqav2", releases["vqav2"], annotations="x"), "parquet release takes no option 'annotations'"),
        (lambda: read_task("vqav2", write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "?"}])),
         "needs annotations="),
        (lambda: read_task("pope", write_jsonl(tmp_path / "p.jsonl", [{"id": 1}]), annotations="x"),
         "line 1 has no 'question_id'"),
        (lambda: read_task("vqav2", write_jsonl(tmp_path / "q2.jsonl", [{"question_id": 1, "text": "?"}]),
                           tmp_path / "no_images", annotations="a.json"), "image folder not found"),
        (lambda: score_task("vqav2", read_task("vqav2", releases["vqav2"]), ["a"]), "1 responses for 3 questions"),
        (lambda: score_task("mm_safetybench", [], []), "is a safety benchmark"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message.replace("?", r"\?").replace("(", r"\(")) as err:
            call()
        assert "\n" not in str(err.value)
    [ex] = read_task("textvqa", releases["textvqa"])
    ex.extra.pop("answers")
    with pytest.raises(UserError, match="id=7 carries no reference 'answers'"):
        score_task("textvqa", [ex], ["nike"])
    assert set(TASK_KINDS) >= set(UTILITY_KINDS)


def test_scoring_a_llava_answers_file(tmp_path, capsys):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": "x.jpg", "text": f"Q{i}?"} for i in (1, 2)])
    ann = write_json(tmp_path / "ann.json", {"annotations": [
        {"question_id": 1, "answers": vqa_answers(("cat", 10))}, {"question_id": 2, "answers": vqa_answers(("dog", 10))}]})
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "prompt": "Q1?", "text": "Cat."},
                                                 {"question_id": 2, "prompt": "Q2?", "text": "a cat"}])
    score_main(["vqav2", str(q), "--annotations", str(ann), "--answers", str(answers)])
    assert "| all |         0.5000 |" in capsys.readouterr().out
    swapped = write_jsonl(tmp_path / "swapped.jsonl", [{"question_id": 2, "text": "dog"}, {"question_id": 1, "text": "cat"}])
    score_main(["vqav2", str(q), "--annotations", str(ann), "--answers", str(swapped)])  # matched by question_id
    assert "| all |         1.0000 |" in capsys.readouterr().out
    no_ids = write_jsonl(tmp_path / "no_ids.jsonl", [{"text": "dog"}])
    with pytest.raises(UserError, match="1 answers for 2 questions \\(and no question_id"):
        score_main(["vqav2", str(q), "--annotations", str(ann), "--answers", str(no_ids)])


def test_parquet_image_checks_name_the_file_and_row(releases, tmp_path):
    [ex] = read_task("textvqa", releases["textvqa"])
    file = ex.image.split("#")[0]
    for ref, message in ((f"{file}#image/5", "no row 5 .*the file has 1 rows"),
                         (f"{file}#picture/0", "no column 'picture'"),
                         (f"{tmp_path}/gone.parquet#image/0", "parquet file not found")):
        with pytest.raises(UserError, match=message):
            check_images([replace(ex, image=ref)])
        with pytest.raises(UserError, match=message):
            load_image(replace(ex, image=ref))
