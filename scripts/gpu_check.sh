#!/usr/bin/env bash
# GPU check of full fine-tuning at scale, one GPU, at most 8 minutes after the environment is ready (every
# stage under `timeout`; the timeouts add up to 480 s). One JSON out: $OUT/gpu_check.json.
#   numerics    the weight change of bf16 full NPO (fp32 masters / Kahan / plain bf16) against an fp32 run
#   full        full NPO on a LLaVA-1.5-7B-shaped random model, bf16, optim.master_weights=kahan: peak memory
#               against `--plan`'s per-GPU estimate
#   deepspeed   the same under DeepSpeed ZeRO-2 on one GPU (the layers that fit the GPU by the plan)
#   checkpoint  save -> resume=last with more steps -> export (model/ loads with from_pretrained)
#   generation  batched greedy generation throughput on the 7B shape (scripts/gpu_check.py; its LoRA step
#               timings are dropped to stay within 8 minutes: run scripts/gpu_check.py alone for them)
# Python: $PYTHON if set; else .venv/bin/python if its torch sees CUDA; else .venv-gpu (made by an earlier run);
# else the machine's python3 if its torch sees CUDA (a GPU image; .venv-gpu on top of it when the project's
# packages are missing); else a new .venv-gpu with a CUDA torch from the registry. Never the CPU build on a GPU.
# Usage: scripts/gpu_check.sh [--tiny]   (--tiny: CPU smoke mode, toy shape, DeepSpeed skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

cuda_ok() {
  [ -x "$(command -v "$1")" ] &&
    timeout 120 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}
project_ok() {
  timeout 120 "$1" -c 'import lightning, transformers, peft, optimi, deepspeed, omegaconf, torchmetrics, pandas' 2>/dev/null
}
registry_ok() {  # the pip index (PIP_INDEX_URL or PyPI) answers
  timeout 15 "$1" -c 'import os, urllib.request as u
u.urlopen(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/pip/", timeout=10)' 2>/dev/null
}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    if [ $TINY = 1 ] || cuda_ok "$PYTHON"; then echo "$PYTHON"; return; fi
    echo "PYTHON=$PYTHON has no CUDA torch; unset it to let the script choose" >&2; return 1
  fi
  if [ $TINY = 1 ]; then  # the CPU smoke mode runs whatever torch there is
    if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi; return
  fi
  if cuda_ok .venv/bin/python; then echo .venv/bin/python; return; fi
  if cuda_ok .venv-gpu/bin/python && project_ok .venv-gpu/bin/python; then echo .venv-gpu/bin/python; return; fi
  if cuda_ok python3; then
    if project_ok python3; then echo python3; return; fi
    # The project's packages on top of the image's CUDA torch: from the registry, or offline from a folder of
    # wheels ($WHEELHOUSE, default .wheelhouse: `pip download -d .wheelhouse -c constraints.txt lightning ...`
    # on a networked machine, torch and its nvidia-* packages left out).
    local wheels=${WHEELHOUSE:-.wheelhouse} from=()
    if ! registry_ok python3; then
      [ -d "$wheels" ] || {
        echo "python3 has a CUDA torch but not the project's packages; no registry is reachable and no $wheels" >&2
        return 1; }
      from=(--no-index --find-links "$wheels" --no-build-isolation)
    fi
    echo "making .venv-gpu on python3's CUDA torch (system site packages) + the project ${from[*]}" >&2
    python3 -m venv --system-site-packages .venv-gpu >&2
    timeout 900 .venv-gpu/bin/pip install -q "${from[@]}" -e '.[test]' >&2
  else
    registry_ok python3 || {
      echo "no Python with a CUDA torch here (.venv/bin/python's torch: $(.venv/bin/python -c \
        'import torch; print(torch.__version__)' 2>/dev/null || echo absent)) and no registry reachable to install one" >&2
      return 1; }
    echo "making .venv-gpu with a CUDA torch from the registry + the project" >&2
    python3 -m venv .venv-gpu >&2
    timeout 900 .venv-gpu/bin/pip install -q "torch==$(sed -n 's/^torch==//p' constraints.txt)" >&2  # Linux wheels carry CUDA
    timeout 900 .venv-gpu/bin/pip install -q -c constraints.txt -e '.[test]' >&2
  fi
  cuda_ok .venv-gpu/bin/python || { echo ".venv-gpu was made but its torch sees no CUDA device" >&2; return 1; }
  echo .venv-gpu/bin/python
}

if [ $TINY = 0 ] && ! command -v nvidia-smi >/dev/null; then
  echo "no GPU here (nvidia-smi not found); the CPU smoke mode is scripts/gpu_check.sh --tiny" >&2; exit 1
fi
PY=$(pick_python)
echo "python: $PY ($("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda, "visible", torch.cuda.is_available())'))"
[ $TINY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

if [ $TINY = 1 ]; then
  SCALE=(--shape tiny --device cpu --numerics-steps 60)
  GEN=(--tiny --device cpu --eval-samples 6 --eval-batch-size 3 --eval-single 2 --max-new-tokens 3)
else
  SCALE=(--shape llava-1.5-7b --device cuda --ds-layers 0)
  GEN=(--device cuda --eval-samples 200 --eval-batch-size 50 --eval-single 10 --max-new-tokens 32)
fi
declare -A STATUS LIMITS
run_stage() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s)"
  set +e; timeout "$limit" "$@"; local rc=$?; set -e
  STATUS[$name]=$rc
  LIMITS[$name]=$limit
}
# Building the 7B-shaped toy (fp32 random init on the CPU, then bf16) takes most of full's time.
for stage in numerics:50 full:210 deepspeed:130 checkpoint:45; do
  run_stage "${stage%%:*}" "${stage##*:}" "$PY" scripts/gpu_check_scale.py "${SCALE[@]}" --stages "${stage%%:*}" \
    --json "$OUT/part_${stage%%:*}.json"
done
run_stage generation 45 "$PY" scripts/gpu_check.py "${GEN[@]}" --methods none --json "$OUT/part_generation.json"

status_json=$(for k in numerics full deepspeed checkpoint generation; do printf '"%s": %s,' "$k" "${STATUS[$k]}"; done)
limits_json=$(for k in numerics full deepspeed checkpoint generation; do printf '"%s": %s,' "$k" "${LIMITS[$k]}"; done)
"$PY" - "$OUT" "$PY" "{${status_json%,}}" "{${limits_json%,}}" <<'EOF'
import json, sys
from pathlib import Path
out, python, status = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
report = {"python": python, "exit_codes": status, "timeouts_s": json.loads(sys.argv[4]), "exit_code_meaning": "0 ok, 124 timed out, other: failed",
          "stages": {}, "generation": None}
for stage, rc in status.items():
    part = out / f"part_{stage}.json"
    data = json.loads(part.read_text()) if part.exists() else None
    if stage == "generation":
        report["generation"] = data
        continue
    if data:
        report.update({k: v for k, v in data.items() if k != "stages"})
    report["stages"][stage] = (data or {}).get("stages", {}).get(stage) or {"error": f"no result (exit code {rc})"}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"results: {out / 'gpu_check.json'}")
EOF
