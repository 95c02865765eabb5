"""The GPU check script runs end to end in its CPU smoke mode (toy shape): every method trains and
reports finite throughput, counted FLOPs and memory; the batched evaluation answers every prompt.

The full fine-tuning check (scripts/gpu_check_scale.py, run by scripts/gpu_check.sh) in its CPU smoke mode:
the same fit-CLI code path at a toy shape. Real values: bf16 weights with fp32 masters or Kahan summation
move like the fp32 run (slope ~1), plain bf16 AdamW loses the updates (lr 1e-5 is below half a bf16
spacing per step); the plan's estimate is finite with ~10 bytes per parameter of model states under Kahan;
a checkpoint saved at step 3 resumes to step 5 and the export loads with from_pretrained."""

from __future__ import annotations

import pytest
import json
import math
import subprocess
import sys

from test_bad_inputs import REPO, TIMEOUT_S, cli_env

pytestmark = [pytest.mark.slow, pytest.mark.scale]  # every test here trains, generates or spawns


def test_gpu_check_smoke_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--tiny", "--device", "cpu", "--steps", "1",
                           "--warmup", "1", "--peak-tflops", "1", "--eval-samples", "6", "--eval-batch-size", "3",
                           "--eval-single", "2", "--max-new-tokens", "3", "--json", str(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["training"]}
    assert list(rows) == ["sft", "npo", "rmu"]
    for r in rows.values():
        for key in ("tokens_per_s", "flops_per_step", "peak_memory_gib", "mfu"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key)
    # NPO and RMU train on a forget and a retain batch: twice SFT's tokens; RMU trains fewer tensors.
    assert rows["npo"]["tokens_per_step"] == rows["rmu"]["tokens_per_step"] > rows["sft"]["tokens_per_step"]
    assert rows["rmu"]["trainable_params"] < rows["npo"]["trainable_params"]
    # NPO adds a reference forward to two forward+backward passes: more FLOPs than one SFT step.
    assert rows["npo"]["flops_per_step"] > 2 * rows["sft"]["flops_per_step"]
    for method in rows:
        assert any(line.startswith(method) for line in proc.stdout.splitlines())
    batched, single = report["generation"]  # every prompt answered, batched and at batch 1
    assert (batched["samples"], batched["batch_size"], single["samples"], single["batch_size"]) == (6, 3, 2, 1)
    assert batched["samples_per_s"] > 0 and single["samples_per_s"] > 0
    assert "evaluation: 6 greedy generations" in proc.stdout


def test_scale_check_smoke_mode(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check_scale.py", "--shape", "tiny", "--device", "cpu",
                           "--json", str(out)], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads(out.read_text())["stages"]
    assert not [s for s, r in stages.items() if "error" in r], {s: r.get("error") for s, r in stages.items()}
    runs = stages["numerics"]["runs"]
    assert runs["fp32"]["slope_on_fp32"] == pytest.approx(1.0)
    for name in ("bf16_fp32_masters", "bf16_kahan"):
        assert 0.8 <= runs[name]["slope_on_fp32"] <= 1.2, runs
        assert runs[name]["changed_fraction"] > 0.5, runs
    assert runs["bf16_none"]["slope_on_fp32"] < 0.3 and runs["bf16_none"]["changed_fraction"] < 0.3, runs
    full = stages["full"]
    assert full["weight_dtypes"] == ["BF16"] and full["plan"]["update_path_name"] == "kahan"
    assert math.isfinite(full["plan"]["total_gib"]) and full["plan"]["total_gib"] > 0
    # bf16 weights + bf16 gradients + two bf16 moments + bf16 Kahan compensation: ~10 bytes per parameter
    assert 8 <= full["plan"]["model_states_gib"] * 2**30 / full["parameters"] <= 12, full["plan"]
    assert stages["deepspeed"]["skipped"].startswith("needs CUDA")
    ckpt = stages["checkpoint"]
    assert (ckpt["save"]["step"], ckpt["resume"]["step"]) == (3, 5)
    assert ckpt["save"]["checkpoint_gib"] > 0
    assert ckpt["export"]["from_pretrained"] == "LlavaForConditionalGeneration"
    assert ckpt["export"]["parameters"] == full["parameters"] and ckpt["export"]["changed_by_resume"] > 0.1


def test_gpu_check_refuses_to_run_without_a_cuda_torch(tmp_path):
    """Outside its --tiny smoke mode the check never runs a CPU torch: here (no GPU) it stops in one line."""
    env = {**cli_env(), "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode != 0
    if "nvidia-smi not found" not in proc.stderr:  # a machine with a GPU driver but this CPU torch
        assert f"PYTHON={sys.executable} has no CUDA torch" in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
