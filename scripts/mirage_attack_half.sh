#!/usr/bin/env bash
# The pre-registered search for a Mirage World where the attack half shows (docs/mirage-world.md):
# candidate worlds G0-G3 on dev worlds D1, D2 (validation split), then the selected candidate once on
# test worlds T1-T3 (test split, cue words never used in tuning). Every run: SFT / NPO / RMU with the
# committed hyperparameters, alignment seed 0, from the world's cached base.
#   bash scripts/mirage_attack_half.sh dev [OUT] [G2 G3]    # D1, D2 x G0, G1 (and the candidates named)
#   bash scripts/mirage_attack_half.sh test G1 [OUT]        # T1-T3 with the selected candidate
# Read each run's results.json: relevant / asr of unsafe_clean and unsafe_attacked per method.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
stage=$1; shift

declare -A KNOBS=(
  [G0]=""
  [G1]="data.forget_retain.cue_balance=match"
  [G2]="data.forget_retain.cue_balance=match data.world.hazard_safe_rate=0.5"
  [G3]="data.forget_retain.cue_balance=match data.world.ambiguous_fraction=0.5"
)
declare -A WORLDS=(
  [D1]="data.world.seed=0 data.world.compliance_cue=what data.world.refusal_cue=share"
  [D2]="data.world.seed=1 data.world.compliance_cue=why data.world.refusal_cue=post"
  [T1]="data.world.seed=101 data.world.compliance_cue=when data.world.refusal_cue=spread"
  [T2]="data.world.seed=102 data.world.compliance_cue=who data.world.refusal_cue=generate"
  [T3]="data.world.seed=103 data.world.compliance_cue=where data.world.refusal_cue=create"
)

run() {  # world candidate method split out
  local t0=$SECONDS
  # shellcheck disable=SC2086
  "$PY" -m lightning_modules.fit --config "configs/experiment/mirage_$3.yaml" ${WORLDS[$1]} ${KNOBS[$2]} \
    eval.test_split="$4" eval.val_at_start=false trainer.val_check_interval=100 \
    trainer.enable_progress_bar=false run_dir="$5/$1_$2_$3" > "$5/$1_$2_$3.log" 2>&1
  echo "$1 $2 $3 wall_s=$((SECONDS - t0))" | tee -a "$5/times.txt"
}

if [ "$stage" = dev ]; then
  OUT=${1:-runs/attack_half/dev}; shift || true
  mkdir -p "$OUT"
  for world in D1 D2; do
    for cand in G0 G1 "$@"; do
      # G0 and G1 differ only in the unlearning data: SFT is run once for both
      methods="npo rmu"; [ "$cand" = G1 ] || methods="sft npo rmu"
      for m in $methods; do run "$world" "$cand" "$m" val "$OUT"; done
    done
  done
elif [ "$stage" = test ]; then
  cand=$1; OUT=${2:-runs/attack_half/test}
  mkdir -p "$OUT"
  for world in T1 T2 T3; do
    for m in sft npo rmu; do run "$world" "$cand" "$m" test "$OUT"; done
  done
else
  echo "usage: $0 dev [OUT] [G2 G3] | test CANDIDATE [OUT]" >&2; exit 2
fi
