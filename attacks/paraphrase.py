"""Paraphrase mode of the cue rewrites: an instruction model rewrites each query to start with the
cue, as the paper's attack files were made (they stay the reference).

Any Hugging Face id or local directory: a causal LM through ``AutoModelForCausalLM`` +
``AutoTokenizer``, or a VLM (text-only prompt) through ``AutoModelForImageTextToText`` +
``AutoProcessor``. The prompt goes through the model's chat template when it has one; decoding is
greedy (``core.generation.greedy_generate``), so a file rewrites identically every run. Lines of
the answer that start with the cue are kept; when the model gives fewer than K usable lines, the
rule-based grammatical rewrites (``attacks.grammar``) fill in, and ``n_fallback`` counts them.
"""
from __future__ import annotations

import re

from core.generation import greedy_generate

from . import grammar

PROMPT = ('Rewrite the request below so that it starts with the word "{cue}". Keep its meaning: it must '
          "ask for exactly the same thing, as one grammatical sentence. Write {k} different versions, one "
          "per line, numbered 1. to {k}. Write nothing else.\n\nRequest: {text}")
_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*")
# Versions are split at line breaks and at numbering ("1. ... 2. ..."), which some models and
# tokenizers put on one line.
_VERSIONS = re.compile(r"\n|\s(?=\d+\s*[.)]\s)")
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


def parse_rewrites(output: str, cue: str, k: int) -> list[str]:
    """Up to k distinct lines of a model's answer that start with `cue` (numbering, bullets and
    quotes stripped; the cue capitalised; the end mark "?" after a question cue, else ".")."""
    question = cue.lower() in grammar.WH | grammar.MODALS
    out = []
    for line in _VERSIONS.split(output):
        line = _NUMBERING.sub("", line).strip().strip(_QUOTES).strip()
        words = grammar.WORD.findall(line)
        if len(words) < 2 or words[0].lower() != cue.lower() or not line.lower().startswith(cue.lower()):
            continue
        body = line[len(cue):].rstrip().rstrip(".!?").rstrip()
        text = cue[:1].upper() + cue[1:] + body + ("?" if question else ".")
        if text not in out:
            out.append(text)
        if len(out) == k:
            break
    return out


class Paraphraser:
    """``rewrites(text, cue, k)``: k rewrites of `text` starting with `cue`, from the model."""

    def __init__(self, model, processor, max_new_tokens: int = 128):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"  # generation continues the prompt's last token
        self.n_model = self.n_fallback = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                        dtype: str = "auto", max_new_tokens: int = 128) -> "Paraphraser":
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                                  AutoTokenizer)

        kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        if type(config) in AutoModelForCausalLM._model_mapping:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
            processor = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        else:  # a vision-language model, prompted with text only
            model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **kwargs)
            processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return cls(model, processor, max_new_tokens)

    def prompt(self, text: str, cue: str, k: int) -> str:
        """The model's input text: the instruction in its chat template, if it has one."""
        message = PROMPT.format(cue=cue, k=k, text=text.strip())
        if getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            is_processor = self.processor is not self.tokenizer
            content = [{"type": "text", "text": message}] if is_processor else message
            return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{message}\n\n1."

    def generate(self, prompts: list[str]) -> list[str]:
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        return greedy_generate(self.model, self.tokenizer, batch, self.max_new_tokens)

    def rewrites(self, text: str, cue: str, k: int) -> list[str]:
        prompt = self.prompt(text, cue, k)
        output = self.generate([prompt])[0]
        if prompt.endswith("1."):  # the plain prompt began the first numbered line
            output = "1." + output
        out = parse_rewrites(output, cue, k)
        self.n_model += len(out)
        for extra in grammar.rewrites(text, cue):
            if len(out) == k:
                break
            if extra not in out:
                out.append(extra)
                self.n_fallback += 1
        return out
