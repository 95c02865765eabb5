"""Writing a checkpoint adds well under one state's size to the process's peak memory (a 7B full
fine-tune's state is ~80 GB: a serialised copy in memory would not fit beside it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

STATE_MB = 256

MEASURE = """
import io, json, resource, sys, torch
from pathlib import Path
from lightning_modules.run.checkpointing import AtomicCheckpointIO

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

state = {"state_dict": {f"w{i}": torch.randn(1024, 1024) for i in range(%(n)d)}, "global_step": 1}
path = Path(sys.argv[1]) / "last.ckpt"
before = peak_mb()
if sys.argv[2] == "streamed":
    AtomicCheckpointIO().save_checkpoint(state, path)
else:  # what the checkpoint writer did before: serialise into memory, then write the bytes
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())
print(json.dumps({"added_mb": peak_mb() - before, "file_mb": path.stat().st_size / 2**20}))
"""


def added_peak_mb(tmp_path, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE % {"n": STATE_MB // 4}, str(tmp_path), how],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_checkpoint_adds_well_under_one_state_to_peak_memory(tmp_path):
    streamed = added_peak_mb(tmp_path, "streamed")
    assert streamed["file_mb"] > STATE_MB * 0.99
    assert streamed["added_mb"] < 0.2 * STATE_MB, streamed
    # The measurement can fail: the old way (a BytesIO of the whole state) adds ~0.8-1x the state
    # (measured 211 and 256 MB for 256 MB), far above the bound the streamed write meets.
    (tmp_path / "last.ckpt").unlink()
    in_memory = added_peak_mb(tmp_path, "in-memory")
    assert in_memory["added_mb"] > 0.5 * STATE_MB, in_memory
