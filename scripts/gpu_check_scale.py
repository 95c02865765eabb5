"""GPU check of full fine-tuning at scale, through the real fit CLI (`lightning_modules.fit.main`, in-process
so that `torch.cuda.max_memory_allocated()` is read after it). Stages (`--stages`, default all):

  numerics    the weight change against an fp32 reference: the same steps of full NPO on a small toy LLaVA
              (configs/model/tiny-llava.yaml) with fp32 weights; bf16 weights with fp32 masters
              (optim.master_weights=fp32); bf16 + Kahan-summed AdamW (kahan); plain bf16 AdamW (none). For
              each: the fraction of weight entries that changed and the least-squares slope (through 0) of
              its weight changes on the fp32 run's (1: moves like fp32; ~0: updates rounded away). lr 1e-5:
              one AdamW step is below half the bf16 spacing of a weight ~N(0, 0.02), the sum is many.
  full        full NPO on the `--shape` model in bf16 under the one-GPU numerics path
              (optim.master_weights=kahan): steps, wall time, peak memory against `--plan`'s estimate.
  deepspeed   the same under DeepSpeed (`--ds-trainer`, trainer.devices=1) on `--ds-layers` decoder layers of
              the shape, by default the most that fit the GPU by the plan (a 7B with fp32 masters, moments
              and fp32 gradients plans at ~121 GiB of model states: an 80 GB GPU holds a slice, the plan is
              linear in layers). CUDA only.
  checkpoint  kahan on `--ckpt-layers` layers: save (checkpoints/last.ckpt) -> resume=last with more steps ->
              export; model/ loads with from_pretrained and differs from the first run's weights.

The toy family is `tiny-llava` (LLaVA-1.5's classes) with `model.tiny` set to the shape; its vocabulary is the
run's trained word-level tokenizer (a few dozen words, not 32,000: the embeddings and lm_head are ~1% of
LLaVA-1.5-7B's parameters), its vision MLP is 2 x vision hidden (CLIP-L's is 4x). Data: a small
VLGuard-format set written here (tests/vlguard_fixture.py).

    python scripts/gpu_check_scale.py --json out.json                       # one GPU, LLaVA-1.5-7B shape
    python scripts/gpu_check_scale.py --shape tiny --device cpu --json o.json  # CPU smoke mode
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from core.files import atomic_write  # noqa: E402
from lightning_modules import fit  # noqa: E402
from lightning_modules.config.loading import load_config  # noqa: E402
from lightning_modules.run.plan import run_plan  # noqa: E402
from models.precision import run_update_path  # noqa: E402
from vlguard_fixture import write_vlguard  # noqa: E402

SHAPES = {  # model.tiny sizes
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 patches) + Llama-2-7B (vocabulary: the trained tokenizer's).
    "llava-1.5-7b": dict(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008,
                         vision_hidden_size=1024, vision_layers=24, vision_heads=16, image_size=336, patch_size=14,
                         max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vision_hidden_size=32,
                 vision_layers=1, vision_heads=2, image_size=32, patch_size=8, max_position_embeddings=1024),
}
STAGES = ("numerics", "full", "deepspeed", "checkpoint")
QUIET = ["trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "trainer.logger=false", "eval.val_at_start=false", "eval.test_at_end=false", "optim.warmup_ratio=0",
         "optim.scheduler=constant", "data.batch_size=1", "data.eval_batch_size=1"]
BF16 = ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"]


class Check:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.cuda = args.device == "cuda"
        self.files = write_vlguard(work / "data", n_train=4, n_val=1, n_test=1,
                                   image_size=SHAPES[args.shape]["image_size"])
        self.device = ["trainer.accelerator=gpu", "trainer.devices=1"] if self.cuda else \
            ["trainer.accelerator=cpu", "trainer.devices=1"]

    def overrides(self, run: str, shape: dict | None, *extra: str) -> list[str]:
        sizes = [f"model.tiny.{k}={v}" for k, v in (shape or {}).items()]
        max_length = 1024 if shape and shape["image_size"] > 64 else 256  # 576 image tokens at 336 px
        return ["data=vlguard", "model=tiny-llava", "method=npo", *sizes,
                *[f"{k}={v}" for k, v in self.files.items()], f"data.image_dir={self.work / 'data'}",
                f"data.max_length={max_length}", *QUIET, *self.device, f"run_dir={self.work / run}",
                f"paths.cache={self.work / 'cache'}", *extra]

    def fit(self, overrides: list[str]) -> dict:
        """One fit in this process: wall time, and (CUDA) peak memory allocated and reserved during it."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fit.main(["--config", "configs/demo.yaml", *overrides])
        out = {"seconds": round(time.perf_counter() - start, 2)}
        if self.cuda:
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        gc.collect()
        return out

    def weights(self, run: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {k: v for f in sorted((self.work / run / "model").glob("*.safetensors")) for k, v in load_file(f).items()}

    def exported(self, run: str) -> tuple[int, list[str]]:
        """(parameters, dtypes) of the exported weights, read from the safetensors headers (no 14 GB load)."""
        from safetensors import safe_open

        count, dtypes = 0, set()
        for path in sorted((self.work / run / "model").glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    count += math.prod(part.get_shape())
                    dtypes.add(part.get_dtype())
        return count, sorted(dtypes)

    def shape(self, layers: int | None = None) -> dict:
        shape = dict(SHAPES[self.args.shape])
        if layers:  # a slice of the shape: same widths, fewer decoder layers
            shape["num_layers"] = min(layers, shape["num_layers"])
        return shape

    # -- stages -------------------------------------------------------------------------------------
    def numerics(self) -> dict:
        steps = self.args.numerics_steps
        common = [f"trainer.max_steps={steps}", "optim.lr=1e-5", "checkpoint.save_last=false"]
        self.fit(self.overrides("n_init", None, *common, "optim.lr=0", "trainer.max_steps=1"))
        init = self.weights("n_init")  # the seed's fp32 start (the bf16 runs start from its rounding)
        runs = {"fp32": [], "bf16_fp32_masters": [*BF16, "optim.master_weights=fp32"],
                "bf16_kahan": [*BF16, "optim.master_weights=kahan"], "bf16_none": [*BF16, "optim.master_weights=none"]}
        weights = {}
        for name, extra in runs.items():
            self.fit(self.overrides(f"n_{name}", None, *common, *extra))
            weights[name] = self.weights(f"n_{name}")
        out = {"model": "tiny-llava (configs/model/tiny-llava.yaml)", "method": "npo", "steps": steps, "lr": 1e-5,
               "runs": {}}
        for name, run in weights.items():
            out["runs"][name] = {"changed_fraction": changed_fraction(init, run),
                                 "slope_on_fp32": slope(init, weights["fp32"], run)}
        return out

    def full(self) -> dict:
        extra = [*BF16, "optim.master_weights=kahan", f"trainer.max_steps={self.args.steps}",
                 "checkpoint.save_last=false", f"model.gradient_checkpointing={str(self.args.checkpointing).lower()}"]
        overrides = self.overrides("full", self.shape(), *extra)
        return self.measured_against_plan(overrides, "kahan")

    def deepspeed(self) -> dict:
        if not self.cuda:
            return {"skipped": "needs CUDA (it measures a DeepSpeed run's GPU memory against the plan)"}
        extra = [f"trainer={self.args.ds_trainer}", "trainer.devices=1", *BF16, f"trainer.max_steps={self.args.steps}",
                 "checkpoint.save_last=false", f"model.gradient_checkpointing={str(self.args.checkpointing).lower()}"]
        layers, fits = self.args.ds_layers, None
        if not layers:  # the most decoder layers whose planned memory fits 85% of the GPU (ZeRO-2 on one
            # GPU keeps fp32 masters + moments + fp32 grads: the whole 7B needs ~123 GiB)
            gib = torch.cuda.get_device_properties(0).total_memory / 2**30
            full = SHAPES[self.args.shape]["num_layers"]
            for layers in [full, *[n for n in (24, 16, 8, 4, 2, 1) if n < full]]:
                fits = plan_summary(self.overrides("ds", self.shape(layers), *extra))["total_gib"] < 0.85 * gib
                if fits:
                    break
        overrides = self.overrides("ds", self.shape(layers), *extra)
        return {"trainer": self.args.ds_trainer, "decoder_layers": self.shape(layers)["num_layers"],
                "layers_chosen_by_plan": not self.args.ds_layers, **self.measured_against_plan(overrides, "strategy")}

    def measured_against_plan(self, overrides: list[str], expected_path: str) -> dict:
        plan = plan_summary(overrides)
        assert plan["update_path_name"] == expected_path, plan["update_path"]
        out = {"plan": plan, **self.fit(overrides)}
        out["parameters"], out["weight_dtypes"] = self.exported(Path(overrides_value(overrides, "run_dir")).name)
        shutil.rmtree(self.work / Path(overrides_value(overrides, "run_dir")).name)  # 14 GB at 7B: the disk is 64
        if self.cuda:  # allocated memory excludes the CUDA context the plan's total counts as overhead
            out["peak_over_plan"] = out["peak_allocated_gib"] / (plan["total_gib"] - plan["overhead_gib"])
            out["reserved_over_plan_total"] = out["peak_reserved_gib"] / plan["total_gib"]
            out["within_20_percent"] = abs(out["peak_over_plan"] - 1) <= 0.2
        return out

    def checkpoint(self) -> dict:
        shape = self.shape(self.args.ckpt_layers)
        first = self.args.steps
        extra = [*BF16, "optim.master_weights=kahan", "checkpoint.save_last=true"]
        out = {"decoder_layers": shape["num_layers"],
               "save": self.fit(self.overrides("ckpt", shape, *extra, f"trainer.max_steps={first}"))}
        last = self.work / "ckpt" / "checkpoints" / "last.ckpt"
        out["save"]["step"] = saved_step(last)
        out["save"]["checkpoint_gib"] = path_size(last) / 2**30
        before = self.weights("ckpt")
        out["resume"] = self.fit(self.overrides("ckpt", shape, *extra, f"trainer.max_steps={first + 2}", "resume=last"))
        out["resume"]["step"] = saved_step(last)
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(self.work / "ckpt" / "model"))
        after = self.weights("ckpt")
        out["export"] = {"from_pretrained": type(model).__name__,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "changed_by_resume": changed_fraction(before, after)}
        return out


def overrides_value(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(key + "="))


def plan_summary(overrides: list[str]) -> dict:
    """`--plan`'s text for the same overrides, and its per-GPU total."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    text = run_plan(cfg)
    def row(name: str) -> float:
        found = re.search(rf"^\s+{re.escape(name)}\s+([\d.,]+) (GiB|MiB)$", text, re.M)
        return float(found.group(1).replace(",", "")) / (1024 if found.group(2) == "MiB" else 1) if found else 0.0

    line = lambda prefix: next((ln.strip()[len(prefix):].strip() for ln in text.splitlines()  # noqa: E731
                                if ln.strip().startswith(prefix)), None)
    return {"total_gib": row("total"), "model_states_gib": row("model states"),
            "overhead_gib": row("CUDA/NCCL overhead"), "update_path_name": run_update_path(cfg).name,
            "update_path": line("update path:"), "strategy": line("strategy:"),
            "parameters": line("parameters:"), "text": text.splitlines()}


def saved_step(path: Path) -> int | None:
    from lightning_modules.run.checkpointing import saved_step as step

    return step(path) if path.exists() else None


def path_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def trained_keys(init: dict) -> list[str]:
    """The weight matrices full fine-tuning trains (the vision tower is frozen in every run)."""
    return [k for k, w in init.items() if w.dim() == 2 and "vision_tower" not in k]


def changed_fraction(init: dict, run: dict) -> float:
    keys = trained_keys(init)
    changed = sum(int((run[k].float() != init[k].to(run[k].dtype).float()).sum()) for k in keys)
    return changed / sum(init[k].numel() for k in keys)


def slope(init: dict, reference: dict, run: dict) -> float:
    """Least-squares slope (through 0) of the run's weight changes on the reference run's; a bf16 run's
    start is the bf16 rounding of the common fp32 start (tests/test_numerics.py)."""
    keys = trained_keys(init)
    x = torch.cat([(reference[k].double() - init[k].double()).flatten() for k in keys])
    y = torch.cat([(run[k].double() - init[k].to(run[k].dtype).double()).flatten() for k in keys])
    return float((x * y).sum() / (x * x).sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llava-1.5-7b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the full / deepspeed / first "
                        "checkpoint run (the resume adds 2)")
    parser.add_argument("--numerics-steps", type=int, default=60)
    parser.add_argument("--ds-trainer", default="deepspeed_zero2",
                        choices=[f"deepspeed_zero{n}{o}" for n in (2, 3) for o in ("", "_offload")])
    parser.add_argument("--ds-layers", type=int, default=0,
                        help="decoder layers of the DeepSpeed run (0: the most that fit the GPU by the plan)")
    parser.add_argument("--ckpt-layers", type=int, default=4, help="decoder layers of the checkpoint run (0: the "
                        "shape's; a 7B Kahan checkpoint is ~54 GB)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="gradient checkpointing in the full and deepspeed runs")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda, but this torch ({torch.__version__}) sees no CUDA device")
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "shape": args.shape, "model_tiny": SHAPES[args.shape],
              "vocabulary": "the run's trained word-level tokenizer (a few dozen words), not LLaVA's 32,064",
              "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(args, Path(tmp))
        for stage in [s for s in args.stages.split(",") if s]:
            if stage not in STAGES:
                sys.exit(f"--stages: unknown stage '{stage}' (accepted: {', '.join(STAGES)})")
            start = time.perf_counter()
            try:
                result = getattr(check, stage)()
            except BaseException as err:  # a stage that fails (OOM included) is a finding, the others still run
                if isinstance(err, KeyboardInterrupt):
                    raise
                result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                          "traceback": traceback.format_exc().splitlines()[-12:]}
            result["stage_seconds"] = round(time.perf_counter() - start, 2)
            report["stages"][stage] = result
            print(f"== {stage}: {json.dumps({k: v for k, v in result.items() if k not in ('plan', 'traceback')})}",
                  flush=True)
            atomic_write(args.json, json.dumps(report, indent=1, default=str), what="GPU check results")
    return report


if __name__ == "__main__":
    main()
