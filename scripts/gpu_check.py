"""GPU check: SFT, NPO and RMU training steps with LoRA on a randomly initialised LLaVA-1.5-7B-shaped
model in bf16 (tokens/s, peak memory and model-FLOPs utilisation (MFU) for each), then a batched
evaluation: ~200 greedy generations, samples/s against batch 1.

    python scripts/gpu_check.py                       # one GPU, LLaVA-1.5-7B shape (CLIP-L/336 + Llama-2-7B)
    python scripts/gpu_check.py --tiny --device cpu   # smoke test of the same code path at a toy shape

Nothing is downloaded: the model comes from a LlavaConfig, the tokenizer is trained offline on the
synthetic texts (ids are a subset of the 32,064-word vocabulary, which does not change the cost).
Each step is the method's own `loss_terms` (lightning_modules/{sft,npo,rmu}.py) + backward + AdamW
on the LoRA parameters (model config: configs/model/llava-1.5-7b.yaml, r=128), without Trainer
overhead. Tokens = every position of every sequence the step trains on, the 576 image tokens
included (NPO: forget + retain batches; RMU: forget + retain). FLOPs are counted, not estimated:
torch's FlopCounterMode over one step (matmuls and attention actually executed: LoRA's frozen
weights get no weight gradient, RMU's forwards stop after layer ℓ, NPO's reference forward (the
adapter-disabled model, `method.reference=adapter`) is counted). MFU = counted FLOPs per step /
step time / the GPU's dense bf16 peak. With --gradient-checkpointing the recomputed forwards are
counted too (hardware FLOPs, HFU). RMU's ℓ is
`method.layer=auto`: 7 (layers 5-7 trained) on the 32-layer shape.

Evaluation: the trained LoRA model answers `--eval-samples` prompts through `greedy_generate` (the one
decoding function of validation, evaluate and harvest) at `--eval-batch-size`, left-padded with a KV
cache, then `--eval-single` of them one at a time. A random model never emits its stop token, so every
answer runs to `--max-new-tokens`: the worst case of a real evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.files import atomic_write  # noqa: E402
from core.generation import greedy_generate  # noqa: E402
from datamodules.collate import VLMCollator  # noqa: E402
from datamodules.examples import Example  # noqa: E402
from models.backbone import apply_finetune_mode  # noqa: E402
from lightning_modules.methods import get_method  # noqa: E402
from core.paths import CONFIG_ROOT  # noqa: E402
from lightning_modules.config.loading import load_config  # noqa: E402
from models.tiny import TinyConfig, build_tiny_processor, train_tokenizer  # noqa: E402

SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 patches) + Llama-2-7B.
    "llava-1.5-7b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
        "overrides": ["model=llava-1.5-7b", "model.gradient_checkpointing=false"],
        "response_words": 96,
    },
    "tiny": {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024),
        "overrides": ["model=llava-1.5-7b", "model.gradient_checkpointing=false", "model.lora.r=8",
                      "model.lora.alpha=16"],
        "response_words": 12,
    },
}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0)]
WORDS = "the a object picture color shape red green blue make how what share tell mix heat with then it is".split()


def synthetic_examples(workdir: Path, n: int, image_size: int, response_words: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        path = workdir / f"{i}.png"
        Image.new("RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in range(3))).save(path)
        instruction = " ".join(rng.choice(WORDS) for _ in range(16)) + "?"
        response = " ".join(rng.choice(WORDS) for _ in range(response_words)) + "."
        out.append(Example(id=str(i), image=str(path), instruction=instruction, response=response, safe=i % 2 == 0))
    return out


def build_model(shape: dict, examples: list[Example], device: str, dtype: torch.dtype):
    tokenizer = train_tokenizer([t for ex in examples for t in (ex.instruction, ex.response)])
    vision = CLIPVisionConfig(**shape["vision"])
    text = LlamaConfig(**shape["text"], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device(device):  # random init directly on the device, in the target dtype
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    processor = build_tiny_processor(tokenizer, TinyConfig(image_size=vision.image_size, patch_size=vision.patch_size))
    return model, processor


def method_config(shape: dict, method: str, seed: int):
    overrides = list(shape["overrides"]) + [f"method={method}", f"seed={seed}"]
    if method == "npo":  # the reference as a forward per step (adapter disabled), not NPO's precomputed NLL cache
        overrides.append("method.reference=adapter")
    return load_config(CONFIG_ROOT.parent / "configs" / "demo.yaml", overrides)


def measure(module, batch: dict, steps: int, warmup: int, device: torch.device) -> dict:
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        module.loss_terms(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    with FlopCounterMode(display=False) as counter:  # after timing: counting slows the step down
        step()
    parts = [batch[k] for k in ("forget", "retain")] if "forget" in batch else [batch]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in parts))
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"trainable_params": sum(p.numel() for p in params), "tokens_per_step": tokens,
            "step_s": seconds, "tokens_per_s": tokens / seconds, "flops_per_step": counter.get_total_flops(),
            "peak_memory_gib": peak / 2**30, "peak_memory_kind": "cuda allocated" if cuda else "process RSS"}


def measure_generation(model, processor, examples: list[Example], batch_size: int, max_new_tokens: int,
                       device: torch.device) -> dict:
    """Greedy answers to `examples` in batches of `batch_size`: samples/s and generated tokens/s."""
    collate = VLMCollator(processor, max_length=4096, train=False)
    batches = [move_data_to_device(collate(examples[i:i + batch_size]), device)
               for i in range(0, len(examples), batch_size)]  # collation is data loading, not timed
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = [a for batch in batches for a in greedy_generate(model, processor, batch, max_new_tokens)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "samples": len(answers), "seconds": seconds,
            "samples_per_s": len(answers) / seconds, "max_new_tokens": max_new_tokens}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shape (smoke test; default: LLaVA-1.5-7B shape)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch (NPO/RMU: forget and retain each)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method (allocator, kernels)")
    parser.add_argument("--methods", default="sft,npo,rmu")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder and vision layers (default: the shape's; fewer fit a smaller device)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    parser.add_argument("--eval-samples", type=int, default=200, help="generations at --eval-batch-size")
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--eval-single", type=int, default=10, help="generations at batch 1 (the baseline)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES["tiny" if args.tiny else "llava-1.5-7b"]
    if args.layers is not None:
        shape = {**shape, "vision": {**shape["vision"], "num_hidden_layers": args.layers},
                 "text": {**shape["text"], "num_hidden_layers": args.layers}}
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        examples = synthetic_examples(Path(tmp), 4 * args.batch_size, shape["vision"]["image_size"],
                                      shape["response_words"])
        t0 = time.perf_counter()
        model, processor = build_model(shape, examples, str(device), dtype)
        model_cfg = method_config(shape, "sft", 0).model
        model = apply_finetune_mode(model, model_cfg)  # LoRA from the model config (r, alpha, targets)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e9:.3f}B parameters in {dtype}, LoRA r={model_cfg.lora.r}, built in "
              f"{time.perf_counter() - t0:.1f} s on {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
        collate = VLMCollator(processor, max_length=4096, train=True)
        b = args.batch_size
        sft_batch = collate(examples[:b])
        pair_batch = {"forget": collate(examples[b:2 * b]), "retain": collate(examples[2 * b:3 * b])}
        # RMU narrows the trainable set (down_proj of layers ℓ-2..ℓ): it runs last on the shared model.
        for name in [m for m in ("sft", "npo", "rmu") if m in args.methods.split(",")]:
            cfg = method_config(shape, name, 0)
            module = get_method(name)(model, processor, cfg).to(device)
            batch = move_data_to_device(sft_batch if name == "sft" else pair_batch, device)
            row = {"method": name, **measure(module, batch, args.steps, args.warmup, device)}
            results.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        generation = []
        if args.eval_samples > 0:
            (Path(tmp) / "eval").mkdir()
            prompts = synthetic_examples(Path(tmp) / "eval", args.eval_samples, shape["vision"]["image_size"], 0,
                                         seed=1)
            generation = [measure_generation(model, processor, prompts, args.eval_batch_size, args.max_new_tokens,
                                             device),
                          measure_generation(model, processor, prompts[:args.eval_single], 1, args.max_new_tokens,
                                             device)]

    peak = peak_tflops(device, args.peak_tflops)
    print(f"\n{'method':6} {'trainable':>10} {'tokens/step':>11} {'step s':>8} {'tokens/s':>10} "
          f"{'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak mem GiB':>13}")
    for r in results:
        achieved = r["flops_per_step"] / r["step_s"] / 1e12
        r["achieved_tflops"] = achieved
        r["mfu"] = achieved / peak if peak else None
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['method']:6} {r['trainable_params'] / 1e6:9.2f}M {r['tokens_per_step']:11d} {r['step_s']:8.3f} "
              f"{r['tokens_per_s']:10.0f} {r['flops_per_step'] / 1e12:10.3f} {achieved:8.2f} {mfu:>6} "
              f"{r['peak_memory_gib']:13.2f}")
    print(f"(peak bf16: {f'{peak:.0f} TFLOP/s' if peak else 'unknown, pass --peak-tflops'}; "
          f"peak memory = {results[0]['peak_memory_kind'] if results else ''}; "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up)")
    if generation:
        batched, single = generation
        print(f"\nevaluation: {batched['samples']} greedy generations of {args.max_new_tokens} new tokens at batch "
              f"{batched['batch_size']}: {batched['seconds']:.1f} s, {batched['samples_per_s']:.2f} samples/s; "
              f"batch 1 ({single['samples']} samples): {single['samples_per_s']:.2f} samples/s; "
              f"speed-up x{batched['samples_per_s'] / single['samples_per_s']:.1f}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": device_name, "peak_bf16_tflops": peak, "training": results, "generation": generation}
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=1), what="benchmark results")
    return report


if __name__ == "__main__":
    main()
