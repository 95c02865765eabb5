"""Utility on benign questions with a reference answer: VQA-style normalised containment.

The rule, applied to the reference and to the model's response alike:

1. lower-case; newlines and tabs become spaces;
2. a comma between digits is dropped ("1,000" -> "1000");
3. every other punctuation mark becomes a space, except a decimal point between digits ("2.5");
4. the articles "a", "an", "the" are dropped;
5. number words "none", "zero" ... "ten" become digits ("two" -> "2"), as the VQA evaluation does.

The response is correct when the normalised reference occurs in the normalised response as a
whole-word sequence ("2 dogs" contains "2"; "20 dogs" does not). A list of references (VQAv2 has
ten per question) counts if any one matches. Containment rather than exact match because
instruction-tuned VLMs answer in sentences; it over-credits an answer that lists several options.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")  # any punctuation but a decimal point


def normalize_answer(text: str) -> str:
    """The VQA-style normal form described in the module docstring."""
    text = _DIGIT_COMMA.sub("", text.lower())
    text = _PUNCT.sub(" ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def answer_matches(response: str, reference: Union[str, Iterable[str], None]) -> Optional[bool]:
    """True / False by the containment rule; None where there is no usable reference."""
    refs = [reference] if isinstance(reference, str) else list(reference or [])
    refs = [r for r in (normalize_answer(str(r)) for r in refs) if r]
    if not refs:
        return None
    text = f" {normalize_answer(response)} "
    return any(f" {r} " in text for r in refs)
