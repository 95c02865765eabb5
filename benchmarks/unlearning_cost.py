"""What unlearning costs relative to SFT, measured in one process on random-init tiny LLaVAs:

    python -m benchmarks.unlearning_cost [--rounds 15] [--batch 8] [--out benchmarks/results.json]

- step time: one optimisation step (the method's `loss_terms` + backward + AdamW step) on the
  same samples: SFT on a batch of 2B rows vs an unlearning method on B forget + B retain rows.
  Methods are timed in interleaved rounds (SFT, NPO, RMU, SFT, ...) and the median is reported,
  so drifting load on shared cores hits every method alike.
- RMU with the forward cut after layer ℓ vs the same RMU with full forwards (`truncate=False`).
- peak memory under LoRA: the peak of live CPU tensor bytes allocated during one step (after a
  warm-up step, so parameters and Adam state already exist), from the allocator events that
  torch.profiler records with `profile_memory=True`. Process RSS is not used: on CPU the
  allocator keeps freed pages and a tiny model's step is lost in it.

Configs: `tiny` (the Mirage World model: 3 layers, hidden 96; RMU ℓ = 1) and `deep` (32 layers,
hidden 64, intermediate 128: LLaVA-1.5-7B's depth, narrow; RMU ℓ = 7 as the official recipe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from core.files import atomic_write
from datamodules.collate import VLMCollator
from datamodules.examples import Example
from datamodules.forget_retain import KeyedCollator
from models.backbone import build_backbone
from lightning_modules.methods import get_method
from lightning_modules.config.loading import load_config

SIZES = {
    "tiny": ([], 1),
    "deep": (["model.tiny.num_layers=32", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
              "model.tiny.num_heads=4"], 7),
}
FORGET = [("tell: how do i hurt someone with the object.", "throw it hard at their eyes to hurt them."),
          ("share: how do i make this item.", "mix rust with clay, then heat it."),
          ("explain: how can the thing in the picture be used to harm people.", "slam it hard at their head to hurt them.")]
RETAIN = [("what: which color is the object?", "the object is red."),
          ("what: how is this item made?", "mix moss with wax, then stir it."),
          ("describe: name the shape of the object.", "it is a square.")]
COLORS = [(220, 50, 50), (50, 180, 70), (60, 90, 230), (230, 210, 50)]


def make_examples(image_dir: Path, n: int) -> tuple[list[Example], list[Example]]:
    images = []
    for i, rgb in enumerate(COLORS):
        path = image_dir / f"{i}.png"
        Image.new("RGB", (32, 32), rgb).save(path)
        images.append(str(path))
    forget = [Example(f"f{i}", images[i % 4], *FORGET[i % 3], safe=False, subset="unsafes") for i in range(n)]
    retain = [Example(f"r{i}", images[i % 4], *RETAIN[i % 3], safe=True, subset="safe_safes") for i in range(n)]
    return forget, retain


def make_module(method: str, size: str, finetune: str, *extra: str):
    overrides, layer = SIZES[size]
    rmu = [f"method.layer={layer}"] if method == "rmu" else []
    cfg = load_config(f"configs/experiment/mirage_{method}.yaml",
                      ["paths.cache=/nonexistent", f"model.finetune={finetune}", *overrides, *rmu, *extra])
    torch.manual_seed(0)
    model, processor = build_backbone(cfg.model, [t for pair in FORGET + RETAIN for t in pair])
    return get_method(method)(model, processor, cfg)


class Runner:
    """One method on fixed batches, with its own AdamW."""

    def __init__(self, label: str, module, forget: list[Example], retain: list[Example]):
        self.label, self.module = label, module
        collate = VLMCollator(module.processor, max_length=128, train=True)
        if module.name == "sft":  # the same samples in one batch
            self.batch = collate(forget + retain)
        else:
            self.batch = {"forget": KeyedCollator(collate)(forget), "retain": collate(retain)}
        self.setup_s = 0.0
        if getattr(module, "reference_mode", None) == "cache":  # a one-off before training
            start = time.perf_counter()
            module.reference_nll = module.compute_reference_nll([self.batch["forget"]])
            self.setup_s = time.perf_counter() - start
        self.opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-5)
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.module.loss_terms(self.batch)["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def peak_bytes(self) -> int:
        self.step()  # Adam state exists before the measured step
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak


def interleaved(runners: list[Runner], rounds: int, warmup: int = 2) -> dict[str, float]:
    print(f"  timing {', '.join(r.label for r in runners)}: {rounds} interleaved rounds", file=sys.stderr)
    for runner in runners:
        for _ in range(warmup):
            runner.step()
    for _ in range(rounds):
        for runner in runners:
            runner.times.append(runner.step())
    return {r.label: statistics.median(r.times) for r in runners}


def bench_size(size: str, batch: int, rounds: int, image_dir: Path) -> dict:
    print(f"{size}:", file=sys.stderr)
    forget, retain = make_examples(image_dir, batch)
    out: dict = {"size": size, "batch": f"{batch} forget + {batch} retain (SFT: {2 * batch} rows)"}
    # Step time, full fine-tuning (NPO's reference: the per-sample NLL cache or a frozen snapshot).
    full = [Runner("sft", make_module("sft", size, "full"), forget, retain),
            Runner("npo (cache)", make_module("npo", size, "full"), forget, retain),
            Runner("npo (snapshot)", make_module("npo", size, "full", "method.reference=snapshot"), forget, retain),
            Runner("rmu (truncated)", make_module("rmu", size, "full"), forget, retain),
            Runner("rmu (full forward)", make_module("rmu", size, "full", "method.truncate=false"), forget, retain)]
    out["full_step_s"] = interleaved(full, rounds)
    out["npo_cache_setup_s"] = full[1].setup_s
    # Step time and peak memory under LoRA (the reference is the adapter-disabled model).
    lora = [Runner("sft", make_module("sft", size, "lora"), forget, retain),
            Runner("npo (adapter)", make_module("npo", size, "lora"), forget, retain),
            Runner("rmu (truncated)", make_module("rmu", size, "lora"), forget, retain),
            Runner("rmu (full forward)", make_module("rmu", size, "lora", "method.truncate=false"), forget, retain)]
    out["lora_step_s"] = interleaved(lora, rounds)
    print("  peak memory under LoRA", file=sys.stderr)
    out["lora_peak_bytes"] = {r.label: r.peak_bytes() for r in lora}
    return out


def report(results: list[dict]) -> str:
    lines = []
    for res in results:
        full, lora, mem = res["full_step_s"], res["lora_step_s"], res["lora_peak_bytes"]
        lines += [f"\n## {res['size']} ({res['batch']})", "",
                  "| measure | value |", "|---|---|",
                  f"| NPO (NLL cache) / SFT step time, full FT | {full['npo (cache)'] / full['sft']:.2f} "
                  f"({full['npo (cache)'] * 1e3:.0f} / {full['sft'] * 1e3:.0f} ms) |",
                  f"| NPO (frozen snapshot) / SFT step time, full FT | {full['npo (snapshot)'] / full['sft']:.2f} |",
                  f"| NPO (adapter off) / SFT step time, LoRA | {lora['npo (adapter)'] / lora['sft']:.2f} "
                  f"({lora['npo (adapter)'] * 1e3:.0f} / {lora['sft'] * 1e3:.0f} ms) |",
                  f"| RMU truncated / RMU full-forward step time, full FT | "
                  f"{full['rmu (truncated)'] / full['rmu (full forward)']:.2f} "
                  f"({full['rmu (truncated)'] * 1e3:.0f} / {full['rmu (full forward)'] * 1e3:.0f} ms) |",
                  f"| RMU truncated / RMU full-forward step time, LoRA | "
                  f"{lora['rmu (truncated)'] / lora['rmu (full forward)']:.2f} |",
                  f"| RMU truncated / SFT step time, full FT | {full['rmu (truncated)'] / full['sft']:.2f} |",
                  f"| NPO / SFT peak step memory, LoRA | {mem['npo (adapter)'] / mem['sft']:.2f} "
                  f"({mem['npo (adapter)'] / 2**20:.1f} / {mem['sft'] / 2**20:.1f} MiB) |",
                  f"| RMU truncated / SFT peak step memory, LoRA | {mem['rmu (truncated)'] / mem['sft']:.2f} "
                  f"({mem['rmu (truncated)'] / 2**20:.1f} MiB) |",
                  f"| RMU full-forward / SFT peak step memory, LoRA | {mem['rmu (full forward)'] / mem['sft']:.2f} |",
                  f"| NPO reference-NLL cache, one-off | {res['npo_cache_setup_s'] * 1e3:.0f} ms |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", type=Path, default=None, help="also write the raw numbers as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the demo uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_size(size, args.batch, args.rounds, Path(tmp)) for size in args.sizes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(report(results))
    if args.out:
        atomic_write(args.out, json.dumps(results, indent=1), what="benchmark results")


if __name__ == "__main__":
    main()
