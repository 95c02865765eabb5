#!/usr/bin/env bash
# GPU check, at most 8 minutes on one GPU (every step has a timeout; they add up to 7.5 minutes):
#   1. SFT, NPO and RMU steps with LoRA on a random LLaVA-1.5-7B-shaped model in bf16: tokens/s,
#      peak memory and MFU per method, then 200 batched greedy generations against batch 1
#      (scripts/gpu_check.py);
#   2. the fit CLI end to end on the GPU (trainer=gpu: bf16-mixed) on a small Mirage World.
# Usage: scripts/gpu_check.sh [gpu_check.py options]; results land in $OUT (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))"

echo "== 1. LLaVA-1.5-7B shape, LoRA r=128, bf16: SFT / NPO / RMU steps, batched evaluation"
timeout 330 "$PY" scripts/gpu_check.py --device cuda --json "$OUT/gpu_check.json" "$@"

echo "== 2. fit CLI on the GPU (small Mirage World, tiny model, bf16-mixed)"
timeout 120 "$PY" -m lightning_modules.fit --config configs/demo.yaml trainer=gpu \
  data.world.n_base=400 data.world.n_safety=200 data.world.n_val=40 data.world.n_test=40 \
  base.vision_steps=50 base.steps=100 trainer.max_steps=40 trainer.val_check_interval=20 \
  checkpoint.every_n_train_steps=20 data.max_eval_samples=40 \
  paths.cache="$OUT/cache" run_dir="$OUT/run"
echo "results: $OUT"
