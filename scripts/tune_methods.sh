#!/usr/bin/env bash
# The pre-registered hyperparameter grid for the unlearning methods on the Mirage World, run on the
# world's VALIDATION split (eval.test_split=val), seed 0. Selection rule, fixed before looking:
# among settings whose benign accuracy (safe_clean) stays >= 0.75, take the lowest clean ASR on
# unsafe queries; ties go to the higher accuracy. Only clean metrics are used: neither the test
# split nor the one-word attacks choose the hyperparameters.
#   bash scripts/tune_methods.sh [OUT_DIR]      (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/tune}
PY=${PY:-.venv/bin/python}
common="compare.split=val compare.seeds=[0]"
grid() {  # name, methods, overrides
  $PY -m lightning_modules.compare --config configs/experiment/mirage_compare.yaml $common \
    "compare.methods=$2" "compare.overrides=[$3]" run_dir="$OUT/$1" > "$OUT/$1.log" 2>&1
}
mkdir -p "$OUT"
grid lr1e-3 "[ga,graddiff,npo,simnpo,rmu]" "optim.lr=1e-3" &
grid lr3e-4 "[ga,graddiff,npo,simnpo,rmu]" "optim.lr=3e-4" &
wait
grid lr1e-4 "[ga,graddiff,npo,simnpo,rmu]" "optim.lr=1e-4" &
grid rmu_c50_l1 "[rmu]" "method.steering_coeff=50" &
wait
grid rmu_c10_l2 "[rmu]" "method.layer=2" &
grid rmu_c50_l2 "[rmu]" "method.steering_coeff=50,method.layer=2" &
wait
$PY - "$OUT" <<'PY'
import sys, pathlib, pandas as pd
rows = []
for csv in sorted(pathlib.Path(sys.argv[1]).glob("*/results.csv")):
    df = pd.read_csv(csv).assign(setting=csv.parent.name)
    rows.append(df)
df = pd.concat(rows)[["method", "setting", "asr_clean", "accuracy", "rr_unsafe_clean", "ir_attacked"]]
print(df.sort_values(["method", "setting"]).to_string(index=False))
ok = df[df.accuracy >= 0.75].sort_values(["asr_clean", "accuracy"], ascending=[True, False])
print("\nselected (validation split):")
print(ok.groupby("method").head(1).to_string(index=False))
PY
