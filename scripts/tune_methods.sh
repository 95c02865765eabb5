#!/usr/bin/env bash
# The pre-registered hyperparameter grid for the unlearning methods on the Mirage World, run on the
# VALIDATION split (compare.split=val) of the DEV worlds only (compare.dev_world_seeds of
# mirage_compare.yaml, with their cue words from compare.world_overrides). The reported table (configs/experiment/mirage_compare.yaml)
# uses other world seeds (101-103) and other cue words (compare.world_overrides): nothing from the test
# worlds chooses a hyperparameter.
#
# Selection rule, written down before looking: per method, average each setting's metrics over the
# dev worlds; among settings whose benign accuracy (safe_clean) stays >= 0.75, take the lowest clean
# ASR on unsafe queries; ties go to the higher accuracy. Only clean metrics are used: neither the
# test split nor the one-word attacks choose the hyperparameters.
#   bash scripts/tune_methods.sh [OUT_DIR]      (about 1 hour on 2 cores; DEV_WORLDS="0" for one world)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/tune}
PY=${PY:-.venv/bin/python}
# the dev worlds: compare.dev_world_seeds of the reported experiment, unless DEV_WORLDS is set
DEV_WORLDS=${DEV_WORLDS:-$($PY -c "from lightning_modules.config.loading import load_config as l
print(*l('configs/experiment/mirage_compare.yaml').compare.dev_world_seeds)")}
worlds="[$(echo $DEV_WORLDS | tr ' ' ',')]"
common="compare.split=val compare.seeds=[0] compare.world_seeds=$worlds"
grid() {  # name, methods, overrides
  $PY -m lightning_modules.compare --config configs/experiment/mirage_compare.yaml $common \
    "compare.methods=$2" "compare.overrides=[eval.probes=false,$3]" run_dir="$OUT/$1" > "$OUT/$1.log" 2>&1
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
rows = [pd.read_csv(csv).assign(setting=csv.parent.name)
        for csv in sorted(pathlib.Path(sys.argv[1]).glob("*/results.csv"))]
cols = ["asr_clean", "accuracy", "rr_unsafe_clean", "ir_clean"]
df = pd.concat(rows).groupby(["method", "setting"])[cols].mean().reset_index()  # mean over dev worlds
df["n_worlds"] = pd.concat(rows).groupby(["method", "setting"])["world_seed"].nunique().to_numpy()
print(df.sort_values(["method", "setting"]).to_string(index=False))
ok = df[df.accuracy >= 0.75].sort_values(["asr_clean", "accuracy"], ascending=[True, False])
print("\nselected (validation split of the dev worlds):")
print(ok.groupby("method").head(1).to_string(index=False))
PY
