"""Training step time of every real family at toy size, per method, through the run assembly of `fit`:

    python -m benchmarks.family_step_time [--steps 12] [--batch 4] [--out results.json]

For each family (tiny-llava, tiny-llava-next, tiny-qwen2-vl, tiny-qwen2.5-vl: the configs/model/tiny-*.yaml
sizes, random weights) and method (SFT, NPO, RMU) the run is built as `fit` builds it (model,
processor, datamodule with collation, forget/retain sets) on a generated VLGuard-format directory
with 32x32 images, and a Lightning Trainer runs `--steps` optimisation steps without validation or
logging. A callback times each training batch (data collation excluded, forward + backward +
AdamW included); the median after 2 warm-up steps is reported. SFT trains on B rows, NPO and RMU
on B forget + B retain rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from PIL import Image

from core.files import atomic_write
from lightning_modules.config.loading import load_config
from lightning_modules.run.assembly import build_run

FAMILIES = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl")
METHODS = ("sft", "npo", "rmu")
WARMUP = 2


def write_dataset(root: Path, n: int = 16) -> dict:
    """A VLGuard-format train/val split: alternating safe / unsafe records, one coloured image each."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 50, 50), "green": (50, 180, 70), "blue": (60, 90, 230)}
    records = []
    for i in range(n):
        color = list(colors)[i % 3]
        Image.new("RGB", (32, 32), colors[color]).save(root / "images" / f"{i}.png")
        rec = {"id": f"r{i}", "image": f"images/{i}.png", "safe": i % 2 == 0}
        harmful = {"response": "Sorry, that is illegal.", "harmful_response": "Mix salt with wax, then heat it."}
        rec["instr-resp"] = ([{"safe_instruction": f"What color is the {color} object?", "response": f"It is {color}."},
                              {"unsafe_instruction": f"How do I hurt someone with the {color} object?", **harmful}]
                             if rec["safe"] else [{"instruction": f"Share how to make the {color} object.", **harmful}])
        records.append(rec)
    for split in ("train", "val"):
        (root / f"{split}.json").write_text(json.dumps(records))
    return {"data.train_file": root / "train.json", "data.val_file": root / "val.json", "data.image_dir": root}


class StepTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self.start)


def time_run(family: str, method: str, files: dict, steps: int, batch: int, workdir: Path) -> dict:
    overrides = ["data=vlguard", f"model=tiny-{family}", f"method={method}", f"data.batch_size={batch}",
                 "data.max_length=256", f"paths.cache={workdir / 'cache'}", f"run_dir={workdir / 'run'}",
                 *[f"{k}={v}" for k, v in files.items()]]
    cfg = load_config("configs/demo.yaml", overrides)
    L.seed_everything(0, verbose=False)
    module, data = build_run(cfg)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], accelerator="cpu", use_distributed_sampler=False)
    trainer.fit(module, data)
    n_params = sum(p.numel() for p in module.model.parameters())
    return {"family": family, "method": method, "params": n_params, "steps": len(timer.seconds),
            "median_step_ms": 1000 * statistics.median(timer.seconds[WARMUP:])}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_dataset(Path(tmp) / "data")
        for family in args.families.split(","):
            for method in METHODS:
                rows.append(time_run(family, method, files, args.steps, args.batch, Path(tmp) / f"{family}-{method}"))
    print(f"\n{'family':12} {'method':6} {'params':>8} {'median step ms':>15}")
    for r in rows:
        print(f"{r['family']:12} {r['method']:6} {r['params'] / 1e3:7.0f}k {r['median_step_ms']:15.1f}")
    print(f"(torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, median of "
          f"{args.steps - WARMUP} steps after {WARMUP} warm-up)")
    if args.out:
        atomic_write(args.out, json.dumps(rows, indent=1), what="benchmark results")
    return rows


if __name__ == "__main__":
    main()
