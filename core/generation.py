"""The one decoding function: validation, evaluate, harvest and the VLM judge all generate through
`greedy_generate`, so a fix to decoding (stop tokens, lockstep under sharding) lands everywhere."""

from __future__ import annotations

import torch

# What a batch passes to the model: Qwen2-VL needs `image_grid_thw` and `mm_token_type_ids` (its
# multimodal RoPE), LLaVA-NeXT `image_sizes`; the rest of a batch (labels, examples) stays out.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw",
                "mm_token_type_ids")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


@torch.no_grad()
def greedy_generate(model, processor, batch: dict, max_new_tokens: int, synced_gpus: bool = False) -> list[str]:
    """Greedy continuations of a left-padded prompt batch, decoded without special tokens and stripped.

    `synced_gpus` keeps ranks in lockstep when weights are sharded (FSDP, ZeRO-3): every forward is a
    collective, and a rank that stops early would hang the others."""
    inputs = model_inputs(batch)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if synced_gpus:
        kwargs["synced_gpus"] = True
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, **kwargs)
    finally:
        model.train(was_training)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]
