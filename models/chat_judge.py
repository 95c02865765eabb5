"""A text-only chat model used as a judge (the official pipeline's harmful-answer selector: a
Llama-2-13B-Chat, OPTML-Group/VLM-Safety-Unlearn@1f89239 `data/select_harmful_responses.py` lines
24-35; any instruction-tuned causal LM with a chat template works, a Hub id or a local directory).
`max_new_tokens` 100 as the official script (line 25).

Decoding: the official call (`data/select_harmful_responses.py:84-89`) passes no decoding arguments, so
the checkpoint's own `generation_config` decides: Llama-2-chat's current `generation_config.json` has
`do_sample: true, temperature 0.6, top_p 0.9` (its first upload had no `do_sample`, i.e. greedy), so the
official selection samples unless an old copy was used. `decoding="checkpoint"` (the default) does the same;
`decoding="greedy"` is deterministic (a setting: `--judge-decoding greedy`,
`data.forget_retain.judge_decoding=greedy`). Sampling draws from torch's global generator: seed it.
"""

from __future__ import annotations

import torch

from core.errors import UserError
from core.generation import greedy_generate

MAX_NEW_TOKENS = 100  # data/select_harmful_responses.py line 25
DECODINGS = ("checkpoint", "greedy")


class ChatJudge:
    """`judge(conversation) -> reply`: the conversation (role/content dicts) through the chat template."""

    def __init__(self, model, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS, decoding: str = "checkpoint"):
        if decoding not in DECODINGS:
            raise UserError(f"judge decoding {decoding!r}: choose one of {', '.join(DECODINGS)}")
        self.decoding = decoding
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"judge model {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                            "use an instruction-tuned chat model")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False,
                        max_new_tokens: int = MAX_NEW_TOKENS, device: str | None = None,
                        decoding: str = "checkpoint") -> "ChatJudge":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"cannot load judge model {name_or_path!r}: {first}") from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        if device:
            model.to(device)
        return cls(model.eval(), tokenizer, max_new_tokens, decoding)

    def __call__(self, conversation: list[dict]) -> str:
        # add_generation_prompt: the official call (line 69) omits it, which Llama-2's template does
        # not need ([/INST] ends the prompt) but other chat templates do.
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        batch = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        if self.decoding == "greedy":
            return greedy_generate(self.model, self.tokenizer, batch, self.max_new_tokens)[0]
        with torch.no_grad():  # select_harmful_responses.py:84-89: no decoding arguments
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
