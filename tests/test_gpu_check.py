"""The GPU check script runs end to end in its CPU smoke mode (toy shape): every method trains and
reports finite throughput, counted FLOPs and memory; the batched evaluation answers every prompt."""

from __future__ import annotations

import pytest
import json
import math
import subprocess
import sys

from test_bad_inputs import REPO, TIMEOUT_S, cli_env

pytestmark = pytest.mark.slow  # every test here trains, generates or spawns


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
