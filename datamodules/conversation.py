"""An example as chat messages, and as the one text a training step sees with the span of each answer.

A multi-turn example (`Example.follow_ups`) is trained whole, as LLaVA's trainer does (one sequence,
every gpt turn supervised, the human turns masked: `preprocess_v1`, OPTML-Group/VLM-Safety-Unlearn
@1f89239 llava/train/train_unlearn_full.py lines 429-512). The image belongs to the first user turn.

Templates close an assistant turn in their own way (LLaVA-1.5: a space and no EOS; LLaVA-NeXT-Mistral:
the literal text `<\\s> `; Qwen2-VL: `<|im_end|>` and a newline), so the template's ending is not
trusted: every answer is followed by exactly one end-of-turn token (the tokenizer's EOS), which the
labels include, so generation learns to stop. An ending that starts with that token is kept (Qwen2-VL's
newline then opens the next turn, as the template renders it); any other ending is replaced by it
(LLaVA-1.5 then reads `A1</s>USER: Q2`, LLaVA's own v1 format). Nothing follows the last answer.
"""

from __future__ import annotations

from typing import Callable, Optional

from core.errors import UserError
from datamodules.examples import Example

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> the template's text


def chat_messages(exchanges: list[tuple[str, Optional[str]]], with_image: bool,
                  system_prompt: Optional[str] = None) -> list[dict]:
    """(question, answer) exchanges as chat messages; a last answer of None leaves the question open."""
    messages = []
    if system_prompt:  # e.g. LLaVA-1.5's "A chat between a curious human ..." (its original eval format)
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for k, (question, answer) in enumerate(exchanges):
        image = [{"type": "image"}] if with_image and k == 0 else []
        messages.append({"role": "user", "content": image + [{"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _answer_end(rest: Optional[str], answer: str) -> int:
    """Where the answer ends in what the template renders after its generation prompt (-1: not there)."""
    for text in (answer, answer.strip()):
        at = -1 if rest is None else rest.find(text)
        if at >= 0 and not rest[:at].strip():
            return at + len(text)
    return -1


def labelled_conversation(render: Render, ex: Example, with_image: bool, system_prompt: Optional[str],
                          eos: str) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the example's conversation as trained on, and for each answer the character span
    [start, end) that is labelled: from the end of its generation prompt through its end-of-turn token."""
    exchanges = [(ex.instruction, ex.response), *ex.follow_ups]
    text, spans, before = "", [], ""  # before: the template's text of the exchanges done so far
    for k, (question, answer) in enumerate(exchanges):
        prompt = render(chat_messages([*exchanges[:k], (question, None)], with_image, system_prompt), True)
        full = render(chat_messages(exchanges[:k + 1], with_image, system_prompt), False)
        if not prompt.startswith(before):
            raise UserError(f"record id={ex.id}: the chat template does not render turn {k + 1} after the turns "
                            "before it verbatim, so its answer cannot be labelled")
        text += prompt[len(before):]
        end = _answer_end(full[len(prompt):] if full.startswith(prompt) else None, answer)
        if end < 0:
            raise UserError(f"record id={ex.id}: the chat template does not render the generation prompt followed "
                            "by the response verbatim, so the response cannot be labelled")
        spans.append((len(text), len(text) + end + len(eos)))
        text += full[len(prompt):len(prompt) + end] + eos
        ending = full[len(prompt) + end:]
        if k + 1 < len(exchanges) and ending.startswith(eos):
            text += ending[len(eos):]
        before = full
    return text, spans
