"""Multiple-choice accuracy (ScienceQA-IMG, MMBench): which option a free-form answer picks.

The prompt is LLaVA's (`datamodules.benchmarks.prompts`): the question, one line per option
("A. text"), then "Answer with the option's letter from the given choices directly." Models
mostly answer with the letter, but not always in the same way; `extract_choice` reads, in order:

1. the whole answer is a letter: "B", "b", "(B)", "B.", "[B]", "**B**";
2. the answer starts with a letter and a delimiter: "B. cat", "(B) cat", "B) cat", "B: cat";
3. a phrase names one letter: "The answer is B.", "Answer: (B)", "the correct option is C";
4. exactly one option letter stands alone in the answer ("I pick B here"); an "A" followed by a
   lower-case word is read as the article ("A cat sits ...");
5. the answer is, or contains as whole words, exactly one option's text ("cat", "It is a cat.");
   an option contained in a longer matching option ("red" in "dark red") yields to it.

Nothing readable (or two letters at the same step) -> None, scored wrong. LLaVA's own ScienceQA
script accepts only 1, 2 (with ". ") and "The answer is X."; this reader credits the same answers
and more, never a different letter for them.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

from core.errors import UserError

_WHOLE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:)]?")
_LEADING = re.compile(r"[(\[]?([A-Z])(?:[)\]]|[.:](?!\w))")
_PHRASE = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?\s*[:\-]?\s*"
                     r"(?i:option\s+)?[(\[]?([A-Z])\b(?![a-z'])")
_ALONE = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
_ARTICLE_A = re.compile(r"(?<![\w'])A\s+[a-z]")
_MARKUP = re.compile(r"[*`_]+")


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def extract_choice(response: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter a response picks (the module docstring's rules), or None."""
    letters = set(options)
    text = _MARKUP.sub("", response).strip().strip("\"'")
    m = _WHOLE.fullmatch(text)
    if m and m[1].upper() in letters:
        return m[1].upper()
    m = _LEADING.match(text)
    if m and m[1] in letters:
        return m[1]
    for pattern in (_PHRASE, _ALONE):
        found = {x for x in pattern.findall(text) if x in letters}
        if pattern is _ALONE and "A" in found and _ARTICLE_A.search(text):
            found.discard("A")
        if len(found) == 1:
            return found.pop()
        if found:
            return None  # two letters named the same way: no answer
    said = f" {_words(text)} "
    hits = {k: _words(v) for k, v in options.items() if _words(v) and f" {_words(v)} " in said}
    hits = {k: v for k, v in hits.items() if not any(v != w and f" {v} " in f" {w} " for w in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


def multiple_choice_accuracy(responses: Sequence[str], golds: Sequence[str],
                             options: Sequence[Mapping[str, str]]) -> float:
    """Share of responses whose extracted letter is the gold letter, in [0, 1]."""
    if not (len(responses) == len(golds) == len(options)) or not responses:
        raise UserError(f"multiple_choice_accuracy: {len(responses)} responses, {len(golds)} gold letters, "
                        f"{len(options)} option sets")
    return sum(extract_choice(r, o) == g for r, g, o in zip(responses, golds, options)) / len(responses)
