"""A random one-layer Llama saved with its trained tokenizer: the stand-in for a text-only chat LLM
(the selection judge, the paraphraser) that the tests load through the Auto classes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.tiny import train_tokenizer

# role: content lines, then "assistant:" as the generation prompt
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
JUDGE_TEXTS = ["For the image here are several responses 1 2 Please respond with only the number"]


def save_tiny_lm(directory: Path, texts: list[str], chat_template: Optional[str] = None, seed: int = 0) -> Path:
    """Write the model and a tokenizer trained on `texts` (with `chat_template` if given) to `directory`."""
    tok = train_tokenizer(texts)
    if chat_template:
        tok.chat_template = chat_template
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
