"""Spurious-cue audit and record loading, on small hand-made files (never the shared data)."""
import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attacks.audit import audit, first_ngram, first_word
from attacks.records import iter_instructions, load_records

REPO = Path(__file__).resolve().parents[1]

# 3 safe instructions (what, what, can) and 7 unsafe (share x3, describe x2, what, can).
VLGUARD = [
    {"id": "u1", "image": "a.png", "safe": False, "instr-resp": [{"instruction": "Share this.", "response": "No."}]},
    {"id": "u2", "image": "b.png", "safe": False, "instr-resp": [{"instruction": "share that", "response": "No."}]},
    {"id": "u3", "image": "c.png", "safe": False, "instr-resp": [{"instruction": "Describe it.", "response": "No."}]},
    {"id": "u4", "image": "d.png", "safe": False, "instr-resp": [{"instruction": "What is bad?", "response": "No."}]},
    {"id": "s1", "image": "e.png", "safe": True, "instr-resp": [
        {"safe_instruction": "What is this?", "response": "A cat."},
        {"unsafe_instruction": "  \"Share it now.\"", "response": "No."}]},
    {"id": "s2", "image": "f.png", "safe": True, "instr-resp": [
        {"safe_instruction": "What color?", "response": "Red."},
        {"unsafe_instruction": "Can you hack?", "response": "No."}]},
    {"id": "s3", "image": "g.png", "safe": True, "instr-resp": [
        {"safe_instruction": "Can you see?", "response": "Yes."},
        {"unsafe_instruction": "Describe them.", "response": "No."}]},
]

LLAVA = [
    {"id": "l1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A dog."}]},
    {"id": "l2", "image": "b.png", "conversations": [
        {"from": "human", "value": "Share the address.\n<image>"},
        {"from": "gpt", "value": "I'm sorry, I cannot help with that."}]},
    {"id": "l3", "image": "c.png", "safe": False, "conversations": [
        {"from": "human", "value": "<image>\nWhat is her name?"}, {"from": "gpt", "value": "Anna."}]},
]


def write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "attacks.audit", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_first_word_rule():
    assert first_word('  "Share this"') == "share"
    assert first_word("Can't you?") == "can"  # first alphabetic token, as VLGuard's cues are counted
    assert first_word("N/A") == "n"
    assert first_word("123 ?") == "<none>"
    assert first_ngram("What is it?", 2) == "what is"
    assert first_ngram("Describe.", 2) == "describe <end>"


def test_iter_vlguard_labels_and_keys():
    got = list(iter_instructions(VLGUARD))
    assert len(got) == 10
    assert got[0] == ("u1", "Share this.", "unsafe", "instruction")
    assert got[4] == ("s1", "What is this?", "safe", "safe_instruction")
    assert got[5][2:] == ("unsafe", "unsafe_instruction")


def test_iter_llava_labels():
    got = list(iter_instructions(LLAVA))
    assert got[0] == ("l1", "What is shown?", "safe", "conversations")  # <image> removed
    assert got[1][1:3] == ("Share the address.", "unsafe")  # refusal reply -> unsafe
    assert got[2][2] == "unsafe"  # explicit safe key wins over the reply
    custom = list(iter_instructions(LLAVA[:2], label_fn=lambda rec: "unsafe"))
    assert [g[2] for g in custom] == ["unsafe", "unsafe"]


def test_counts_log_odds_and_classifier():
    res = audit(VLGUARD, min_count=1)
    assert (res["n_safe"], res["n_unsafe"], res["vocab_size"]) == (3, 7, 4)
    rows = {r["word"]: r for r in res["rows"]}
    assert (rows["what"]["safe"], rows["what"]["unsafe"]) == (2, 1)
    assert (rows["share"]["safe"], rows["share"]["unsafe"]) == (0, 3)
    # α = 1, V = 4: log((2+1)/(3+4)) - log((1+1)/(7+4))
    assert rows["what"]["log_odds"] == pytest.approx(math.log(3 / 7) - math.log(2 / 11), abs=1e-4)
    assert rows["share"]["log_odds"] == pytest.approx(math.log(1 / 7) - math.log(4 / 11), abs=1e-4)
    assert [c["word"] for c in res["compliance_cues"]] == ["what", "can"]
    assert [c["word"] for c in res["refusal_cues"]] == ["share", "describe"]
    # Rules: what->safe, share/describe->unsafe, can is a 1-1 tie -> overall majority (unsafe).
    assert res["first_word_accuracy"] == pytest.approx(0.8)
    assert res["majority_baseline"] == pytest.approx(0.7)
    assert res["heldout_accuracy"] is not None
    assert audit(VLGUARD, min_count=1) == res  # the held-out split is seeded


def test_min_count_and_bigrams():
    assert audit(VLGUARD, min_count=3)["compliance_cues"] == [{"word": "what", "safe": 2, "unsafe": 1,
                                                              "log_odds": pytest.approx(0.8575, abs=1e-4)}]
    words = {r["word"] for r in audit(VLGUARD, ngram=2, min_count=1)["rows"]}
    assert {"share this", "what is", "what color", "can you"} <= words


def test_llava_audit():
    res = audit(LLAVA, min_count=1)
    assert (res["n_safe"], res["n_unsafe"]) == (1, 2)


@pytest.mark.slow
def test_cli_json(tmp_path):
    path = write(tmp_path, VLGUARD)
    proc = run_cli(path, "--format", "json", "--top", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["file"] == str(path)
    assert {"rows", "compliance_cues", "refusal_cues", "first_word_accuracy", "majority_baseline",
            "n_safe", "n_unsafe"} <= set(out)
    assert {"word", "safe", "unsafe", "log_odds"} <= set(out["rows"][0])
    assert len(out["refusal_cues"]) <= 1


@pytest.mark.slow
def test_cli_markdown_llava(tmp_path):
    proc = run_cli(write(tmp_path, LLAVA), "--min-count", "1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\| word +\| +safe \| +unsafe \| +log_odds \|", proc.stdout)
    assert "share" in proc.stdout and "majority-class baseline" in proc.stdout


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("", "empty"),
    ("[{\"id\": 1,", "malformed JSON"),
    ("{\"a\": 1}", "JSON list"),
    ("[]", "no records"),
    ("[{\"id\": \"x\", \"image\": \"a\"}]", "record 0"),
])
@pytest.mark.slow
def test_cli_errors(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    proc = run_cli(path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0]


def test_load_records_names_record(tmp_path):
    bad = VLGUARD[:2] + [{"id": "z", "instr-resp": [{"answer": "?"}]}]
    with pytest.raises(ValueError, match=r"bad\.json: record 2 \(id 'z'\): instr-resp\[0\]"):
        load_records(write(tmp_path, bad, "bad.json"))
    assert len(load_records(write(tmp_path, VLGUARD))) == 7
