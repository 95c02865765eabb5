"""Examples -> model batches through the processor: chat template, response-only labels, left padding."""

from __future__ import annotations

from typing import Optional

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import BatchFeature

from datamodules.examples import Example
from core.errors import UserError
from core.parquet_images import check_ref, parse_ref
from core.records import read_image

IGNORE_INDEX = -100
# original: the processor's own resize and crop; pad: LLaVA's square padding (`pad_to_square`).
IMAGE_ASPECT_RATIOS = ("original", "pad")


def load_image(ex: Example, image_mode: str = "real", blank_size: int = 336) -> Optional[Image.Image]:
    """The example's image as RGB; `blank` gives a white image of the same size (text-only data)."""
    if image_mode == "none" or (ex.image is None and image_mode != "blank"):
        return None
    if image_mode == "blank":
        size = (blank_size, blank_size)
        if ex.image is not None:
            try:
                size = read_image(ex.image, ex.id, header_only=True)
            except UserError:
                pass  # text-only files: the referenced image is not here, keep the default size
        return Image.new("RGB", size, (255, 255, 255))
    return read_image(ex.image, ex.id)


def pad_to_square(image: Image.Image, mean: Optional[list[float]]) -> Image.Image:
    """LLaVA's `image_aspect_ratio=pad` (its expand2square): the image centred on a square canvas
    filled with the image processor's mean colour, so the processor's resize-and-crop keeps it whole."""
    width, height = image.size
    if width == height:
        return image
    colour = tuple(int(x * 255) for x in (mean or (0.0, 0.0, 0.0)))
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def check_images(examples, image_mode: str = "real") -> None:
    """Fail before training, not hours into it, on a missing or unreadable image: every file must
    exist and have an image header PIL identifies (a header read, milliseconds per thousand). An
    image inside a parquet release is checked by the file's footer (its file, column and row)."""
    if image_mode != "real":
        return
    seen = set()
    for ex in examples:
        if ex.image is None or ex.image in seen:
            continue
        seen.add(ex.image)
        if parse_ref(ex.image):
            check_ref(ex.image, ex.id)
        else:
            read_image(ex.image, ex.id, header_only=True)


def _messages(instruction: str, response: Optional[str], with_image: bool,
              system_prompt: Optional[str] = None) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": instruction}]
    msgs = [{"role": "user", "content": content}]
    if system_prompt:  # e.g. LLaVA-1.5's "A chat between a curious human ..." (its original eval format)
        msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    if response is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return msgs


class VLMCollator:
    """Builds left-padded batches. Training batches carry `labels` masked to the response tokens;
    eval batches carry the prompt only and the examples themselves under `examples`.

    With `cache=True` each example is encoded once (template, tokenizer, image processor) and its
    tensors are kept: later batches only pad and stack them. The batches are identical to the
    uncached ones; a batch whose tensors do not stack (e.g. LLaVA-NeXT images of different tilings)
    is encoded as a whole. The cache holds every distinct example's pixels, so it is meant for small
    images (the Mirage World), not for a real model's 336-pixel ones."""

    def __init__(self, processor, max_length: int, train: bool, image_mode: str = "real",
                 system_prompt: Optional[str] = None, cache: bool = False, image_aspect_ratio: str = "original"):
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise UserError(f"data.image_aspect_ratio='{image_aspect_ratio}': choose one of "
                            f"{', '.join(IMAGE_ASPECT_RATIOS)}")
        self.pad_square = image_aspect_ratio == "pad"
        self.processor = processor
        self.max_length = max_length
        self.train = train
        self.image_mode = image_mode
        self.system_prompt = system_prompt
        self.cache: Optional[dict] = {} if cache else None
        self.processor.tokenizer.padding_side = "left"  # generation continues from the right edge

    def _encode(self, texts: list[str], images: list) -> dict:
        kwargs = dict(text=texts, return_tensors="pt", padding=True)
        if any(img is not None for img in images):
            kwargs["images"] = [img for img in images if img is not None]
        return self.processor(**kwargs)

    def _render(self, messages: list[dict], ex: Example, add_generation_prompt: bool = False) -> str:
        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except TemplateError as err:  # e.g. a system prompt for a template without a system role
            raise UserError(f"record id={ex.id}: the model's chat template refuses the conversation: {err}") from err

    def _training_text(self, prompt: str, full: str, ex: Example) -> str:
        """The prompt, the response as the template places it, and one end-of-turn token.

        Templates close a turn in their own way (LLaVA-1.5: a space and no EOS; LLaVA-NeXT-Mistral: the
        literal text `<\\s> `; Qwen2-VL: `<|im_end|>` and a newline); whatever follows the response is
        dropped and the tokenizer's EOS (the model's end-of-turn token) appended, so the labels are the
        response plus exactly one stop token and generation learns to stop where it is told to."""
        rest = full[len(prompt):] if full.startswith(prompt) else None
        for response in (ex.response, ex.response.strip()):
            at = -1 if rest is None else rest.find(response)
            if at >= 0 and not rest[:at].strip():
                return prompt + rest[:at + len(response)] + self.processor.tokenizer.eos_token
        raise UserError(f"record id={ex.id}: the chat template does not render the generation prompt followed "
                        "by the response verbatim, so the response cannot be labelled")

    def __call__(self, examples: list[Example]) -> dict:
        if self.cache is None:
            return self._encode_batch(examples)
        rows = []
        for ex in examples:
            key = (ex.id, ex.instruction, ex.response if self.train else None, ex.image)
            if key not in self.cache:
                row = self._encode_batch([ex])
                row.pop("examples", None)
                self.cache[key] = dict(row)
            rows.append(self.cache[key])
        batch = self._stack(rows)
        if batch is None:
            return self._encode_batch(examples)
        if not self.train:
            batch["examples"] = examples
        return batch

    def _stack(self, rows: list[dict]) -> Optional[dict]:
        """One-example encodings -> the batch the processor would have made: sequences left-padded,
        everything else concatenated; None where the tensors do not line up."""
        pad_values = {"input_ids": self.processor.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        if any(row.keys() != rows[0].keys() for row in rows):
            return None
        width = max(row["input_ids"].shape[1] for row in rows)
        batch = {}
        for key in rows[0]:
            if key in pad_values:
                batch[key] = torch.cat([torch.nn.functional.pad(row[key], (width - row[key].shape[1], 0),
                                                                value=pad_values[key]) for row in rows])
            elif all(torch.is_tensor(row[key]) and row[key].shape[1:] == rows[0][key].shape[1:] for row in rows):
                batch[key] = torch.cat([row[key] for row in rows])
            else:
                return None
        return BatchFeature(batch)

    def _encode_batch(self, examples: list[Example]) -> dict:
        images = [load_image(ex, self.image_mode) for ex in examples]
        if self.pad_square:
            mean = getattr(getattr(self.processor, "image_processor", None), "image_mean", None)
            images = [pad_to_square(img, mean) if img is not None else None for img in images]
        prompts = [self._render(_messages(ex.instruction, None, img is not None, self.system_prompt), ex,
                                add_generation_prompt=True)
                   for ex, img in zip(examples, images)]
        if not self.train:
            batch = self._encode(prompts, images)
            self._check_length(batch, examples)
            batch["examples"] = examples
            return batch
        fulls = [self._training_text(prompt, self._render(
                     _messages(ex.instruction, ex.response, img is not None, self.system_prompt), ex), ex)
                 for ex, img, prompt in zip(examples, images, prompts)]
        batch = self._encode(fulls, images)
        self._check_length(batch, examples)
        prompt_batch = self._encode(prompts, images)
        prompt_lens = prompt_batch["attention_mask"].sum(1)
        pad_lens = (1 - batch["attention_mask"]).sum(1)
        for i, ex in enumerate(examples):  # the prompt must tokenize the same alone and with its response
            n, pad = int(prompt_lens[i]), int(pad_lens[i])
            prompt_ids = prompt_batch["input_ids"][i, prompt_batch["input_ids"].shape[1] - n:]
            if not torch.equal(batch["input_ids"][i, pad:pad + n], prompt_ids):
                raise UserError(f"record id={ex.id}: the tokenizer merges the end of the prompt with the response, "
                                "so the prompt/response boundary is not a token boundary")
        labels = batch["input_ids"].clone()
        positions = torch.arange(labels.shape[1]).unsqueeze(0)
        labels[positions < (pad_lens + prompt_lens).unsqueeze(1)] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    def _check_length(self, batch: dict, examples: list[Example]) -> None:
        lengths = batch["attention_mask"].sum(1)
        longest = int(lengths.argmax())
        if int(lengths[longest]) > self.max_length:
            # Truncating would cut image tokens or the whole response: refuse instead.
            raise UserError(f"record id={examples[longest].id} is {int(lengths[longest])} tokens long, "
                            f"more than data.max_length={self.max_length}")
