"""The prompts of LLaVA-1.5's evaluation scripts, which the paper's code base runs."""

from __future__ import annotations

from typing import Mapping, Optional

from core.errors import UserError

SHORT_ANSWER = "Answer the question using a single word or phrase."  # VQAv2, TextVQA, POPE
MC_PROMPT = "Answer with the option's letter from the given choices directly."  # ScienceQA, MMBench
LETTERS = "ABCDEFGHIJ"


def option_letters(n: int) -> str:
    if not 2 <= n <= len(LETTERS):
        raise UserError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {n}")
    return LETTERS[:n]


def format_question(question: str, options: Mapping[str, str], hint: Optional[str] = None,
                    prompt: Optional[str] = MC_PROMPT) -> str:
    """LLaVA's layout: [hint]\\nquestion\\nA. option ...\\nprompt."""
    lines = ([hint] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines + ([prompt] if prompt else []))
