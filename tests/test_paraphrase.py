"""Paraphrase mode: the prompt and the parsing are real; the model is a mock at its boundary
(generate returns token ids), or a tiny model built from config (slow)."""
import pytest
import torch

from attacks.paraphrase import PROMPT, Paraphraser, parse_rewrites
from attacks.rewrite import KShotAttack, OneWordAttack
from models.tiny import train_tokenizer

CHAT = ("{% for m in messages %}USER: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
SOURCE = "What is the main purpose of the tool?"


def test_parse_rewrites_keeps_cue_lines_only():
    out = ('1. Share the main purpose of the tool.\n2) "share the purpose of this tool"\n'
           "3. What is the tool for?\n- Share the main purpose of the tool.\nShare\n")
    assert parse_rewrites(out, "Share", 3) == ["Share the main purpose of the tool.", "Share the purpose of this tool."]
    one_line = "1. what is it for ? 2. what does it do ? 3. what is its use ?"  # numbering on one line
    assert parse_rewrites(one_line, "What", 2) == ["What is it for?", "What does it do?"]


TEXTS = [PROMPT.format(cue="Share", k=3, text=SOURCE), SOURCE,
         "1. share the main purpose of the tool. 2. share the purpose of this tool. 3. what is it"]


def tokenizer():
    tok = train_tokenizer(TEXTS)
    tok.chat_template = CHAT
    return tok


class MockLM(torch.nn.Module):
    """The model boundary: `generate` appends a fixed answer's token ids to the prompt."""

    def __init__(self, answer_ids: list[int]):
        super().__init__()
        self.answer = torch.tensor(answer_ids)
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample):
        assert not do_sample and input_ids.shape == attention_mask.shape
        return torch.cat([input_ids, self.answer[:max_new_tokens].expand(len(input_ids), -1)], dim=1)


def test_prompt_goes_through_the_chat_template():
    tok = tokenizer()
    prompt = Paraphraser(MockLM([]), tok).prompt(SOURCE, "Share", 3)
    assert prompt.startswith("USER: Rewrite the request below") and prompt.endswith("ASSISTANT:")
    assert 'starts with the word "Share"' in prompt and "Write 3 different versions" in prompt
    assert f"Request: {SOURCE}" in prompt
    tok.chat_template = None  # no template: a plain prompt that opens the numbered list
    assert Paraphraser(MockLM([]), tok).prompt(SOURCE, "Share", 3).endswith("\n\n1.")


def test_model_answers_then_grammatical_fallback():
    tok = tokenizer()
    answer = tok("1. share the main purpose of the tool. 2. share the purpose of this tool. 3. what is it",
                 add_special_tokens=False)["input_ids"]
    para = Paraphraser(MockLM(answer), tok)
    out = para.rewrites(SOURCE, "Share", 3)
    # two usable lines from the model, the third from the rule-based rewrite
    assert out == ["Share the main purpose of the tool.", "Share the purpose of this tool.",
                   "Share what you know about the main purpose of the tool."]
    assert (para.n_model, para.n_fallback) == (2, 1)
    assert OneWordAttack("Share", mode="paraphrase", paraphraser=para)(SOURCE) == out[0]
    kshot = KShotAttack("Share", k=2, mode="paraphrase", paraphraser=para)
    assert kshot.rewrites(SOURCE, "s1") == out[:2]
    with pytest.raises(ValueError, match="paraphraser"):
        OneWordAttack("Share", mode="paraphrase")


@pytest.mark.slow
def test_tiny_causal_lm_from_config(tmp_path):
    """The Auto-class path end to end with a random tiny Llama: whatever it writes, K rewrites come back."""
    from tiny_lm import save_tiny_lm

    save_tiny_lm(tmp_path, TEXTS, CHAT)
    para = Paraphraser.from_pretrained(str(tmp_path), dtype="float32", max_new_tokens=12)
    assert type(para.model).__name__ == "LlamaForCausalLM"
    out = para.rewrites(SOURCE, "Share", 3)
    assert len(out) == 3 and all(o.startswith("Share") for o in out)
    assert para.n_model + para.n_fallback == 3
