"""Examples -> model batches through the processor: chat template, labels on the answers only, left padding."""

from __future__ import annotations

from typing import Optional

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import BatchFeature

from datamodules.conversation import chat_messages, labelled_conversation
from datamodules.examples import Example
from core.errors import UserError
from core.parquet_images import check_ref, parse_ref
from core.records import read_image

IGNORE_INDEX = -100
# original: the processor's own resize and crop; pad: LLaVA's square padding (`pad_to_square`).
IMAGE_ASPECT_RATIOS = ("original", "pad")
# A training row longer than max_length: refuse (this project's default: truncation can cut the answer
# away) or truncate at the end, labels too, as LLaVA's trainer does after image expansion
# (OPTML-Group/VLM-Safety-Unlearn 1f89239 llava/train/train_unlearn_full.py:773-774, llava/model/llava_arch.py:274-277).
OVERLONG = ("refuse", "truncate")
SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0,
                 "token_type_ids": 0}  # per-token tensors cut with the row (None: the pad token id)


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


class VLMCollator:
    """Builds left-padded batches. Training batches carry the whole conversation (a multi-turn
    example's follow-ups too) with `labels` masked to the answers' tokens (`labelled_conversation`);
    eval batches carry the first question's prompt only and the examples themselves under `examples`.

    With `cache=True` each example is encoded once (template, tokenizer, image processor) and its
    tensors are kept: later batches only pad and stack them. The batches are identical to the
    uncached ones; a batch whose tensors do not stack (e.g. LLaVA-NeXT images of different tilings)
    is encoded as a whole. The cache holds every distinct example's pixels, so it is meant for small
    images (the Mirage World), not for a real model's 336-pixel ones."""

    def __init__(self, processor, max_length: int, train: bool, image_mode: str = "real",
                 system_prompt: Optional[str] = None, cache: bool = False, image_aspect_ratio: str = "original",
                 overlong: str = "refuse"):
        if overlong not in OVERLONG:
            raise UserError(f"data.overlong='{overlong}': choose one of {', '.join(OVERLONG)}")
        self.truncate = overlong == "truncate"
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

    def __call__(self, examples: list[Example]) -> dict:
        if self.cache is None:
            return self._encode_batch(examples)
        rows = []
        for ex in examples:
            key = (ex.id, ex.instruction, ex.response if self.train else None,
                   ex.follow_ups if self.train else (), ex.image)
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
        if not self.train:
            prompts = [self._render(chat_messages([(ex.instruction, None)], img is not None, self.system_prompt),
                                    ex, add_generation_prompt=True) for ex, img in zip(examples, images)]
            batch = self._encode(prompts, images)
            self._check_length(batch, examples)
            batch["examples"] = examples
            return batch
        eos = self.processor.tokenizer.eos_token
        conversations = [labelled_conversation(lambda msgs, gen, ex=ex: self._render(msgs, ex, gen), ex,
                                               img is not None, self.system_prompt, eos)
                         for ex, img in zip(examples, images)]
        batch = self._encode([text for text, _ in conversations], images)
        if not self.truncate:
            self._check_length(batch, examples)
        batch["labels"] = self._labels(batch, conversations, images, examples)
        return self._truncated(batch, examples) if self.truncate else batch

    def _image_token_id(self) -> Optional[int]:
        token_id = getattr(self.processor, "image_token_id", None)
        token = getattr(self.processor, "image_token", None)
        if token_id is None and isinstance(token, str):
            token_id = self.processor.tokenizer.convert_tokens_to_ids(token)
        return token_id

    def _truncated(self, batch: dict, examples: list[Example]) -> dict:
        """Rows longer than max_length cut at the end (their labels too), then left-padded again; a cut
        that would split an image's tokens is refused (the model could not place the image)."""
        lengths = batch["attention_mask"].sum(1).tolist()
        if max(lengths) <= self.max_length:
            return batch
        width, new_width = batch["input_ids"].shape[1], min(max(lengths), self.max_length)
        image_id = self._image_token_id()
        images_before = (batch["input_ids"] == image_id).sum(1) if image_id is not None else None
        for key, fill in SEQUENCE_KEYS.items():
            if key not in batch:
                continue
            old = batch[key]
            fill = self.processor.tokenizer.pad_token_id if fill is None else fill
            new = torch.full((old.shape[0], new_width), fill, dtype=old.dtype)
            for i, n in enumerate(lengths):
                keep = min(n, self.max_length)
                new[i, new_width - keep:] = old[i, width - n: width - n + keep]
            batch[key] = new
        if images_before is not None:
            cut = torch.nonzero(images_before != (batch["input_ids"] == image_id).sum(1)).flatten().tolist()
            if cut:
                raise UserError(f"record id={examples[cut[0]].id}: cutting it to data.max_length={self.max_length} "
                                f"would split its image tokens ({lengths[cut[0]]} tokens); raise data.max_length")
        return batch

    def _labels(self, batch: dict, conversations: list[tuple[str, list]], images: list, examples) -> torch.Tensor:
        """The input ids on the answers' spans, IGNORE_INDEX elsewhere. Each span bound is a text prefix,
        encoded with its row's image (the first: the prompt): its token count is the bound's position,
        and its tokens must be the row's first tokens (a bound that is not a token boundary is refused)."""
        cuts = [(i, at) for i, (text, spans) in enumerate(conversations) for span in spans for at in span
                if at < len(text)]  # the end of the text is the end of the row
        prefixes = self._encode([conversations[i][0][:at] for i, at in cuts], [images[i] for i, _ in cuts])
        pad_lens = (1 - batch["attention_mask"]).sum(1)
        width = batch["input_ids"].shape[1]
        position = {(i, len(text)): width for i, (text, _) in enumerate(conversations)}
        for c, (i, at) in enumerate(cuts):
            n, pad = int(prefixes["attention_mask"][c].sum()), int(pad_lens[i])
            if not torch.equal(batch["input_ids"][i, pad:pad + n],
                               prefixes["input_ids"][c, prefixes["input_ids"].shape[1] - n:]):
                raise UserError(f"record id={examples[i].id}: the tokenizer merges the text on either side of where an "
                                "answer starts or ends, so the prompt/response boundary is not a token boundary")
            position[(i, at)] = pad + n
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, (_, spans) in enumerate(conversations):
            for start, end in spans:
                a, b = position[(i, start)], position[(i, end)]
                labels[i, a:b] = batch["input_ids"][i, a:b]
        return labels

    def _check_length(self, batch: dict, examples: list[Example]) -> None:
        lengths = batch["attention_mask"].sum(1)
        longest = int(lengths.argmax())
        if int(lengths[longest]) > self.max_length:
            # Truncating would cut image tokens or the whole response: refuse instead.
            raise UserError(f"record id={examples[longest].id} is {int(lengths[longest])} tokens long, "
                            f"more than data.max_length={self.max_length}")
