"""Text rules shared by data, attacks and metrics."""

from __future__ import annotations

import re

WORD_RE = re.compile(r"[A-Za-z]+")


def first_word(text: str) -> str:
    """The first alphabetic token, lower-cased ("" when there is none): the rule by which cue words
    are counted everywhere (audit, cue balance, eval sets)."""
    m = WORD_RE.search(text)
    return m.group().lower() if m else ""
