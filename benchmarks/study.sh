#!/usr/bin/env bash
# The real-data study of docs/results.md: every method on an LNT order, for some seeds.
#
#   bash benchmarks/study.sh short1 42 43            # all methods, seeds 42 and 43
#   METHODS="seq ilora" bash benchmarks/study.sh short2 42
#   bash benchmarks/study.sh compare short1          # tables and figures from the finished runs
#   EXTRA="model_name_or_path=/models/X bf16=true" bash benchmarks/study.sh order1 42  # more overrides
#
# Runs go to $RUNS/<order>/<method>_s<seed> (a run that stopped half way resumes; a finished one
# is skipped). `compare` copies each finished run's metrics.json into $DEST/<order>/ (default
# docs/study) and writes comparison.md/.json and the figures there. Settings: examples/lnt_short1.yaml (200 train and
# 50 test rows per task, LoRA rank 8, batch 8, lr 5e-4, 1 epoch) with the overrides below.
# On a CPU with few cores, run two copies side by side with OMP_NUM_THREADS=1 and disjoint METHODS.
set -euo pipefail

RETAIN=${RETAIN:-retain}
RUNS=${RUNS:-runs}
DEST=${DEST:-docs/study}
EXTRA=${EXTRA:-}
METHODS=${METHODS:-"seq seq_lr1e-3 replay ilora ilora_a0.9 peft_lora multitask"}
BASE=examples/lnt_short1.yaml

method_args() {  # the config and overrides of one study entry
  case "$1" in
    seq)        echo "$BASE" ;;
    seq_lr1e-3) echo "$BASE learning_rate=1e-3" ;;
    replay)     echo "$BASE cl_method=replay replay_mix_ratio=1.0 replay_buffer_size=500" ;;
    ilora)      echo "$BASE cl_method=ilora" ;;
    ilora_a0.9) echo "$BASE cl_method=ilora ema_alpha=0.9" ;;
    peft_lora)  echo "examples/peft_lora_generative.yaml eval_max_samples=50" ;;
    multitask)  echo "$BASE cl_method=multitask" ;;
    *) echo "unknown study method '$1'" >&2; return 2 ;;
  esac
}

if [ "${1:-}" = compare ]; then
  order=${2:?usage: study.sh compare ORDER}
  dest=$DEST/$order
  for run in "$RUNS/$order"/*/; do
    [ -f "$run/metrics.json" ] || continue
    mkdir -p "$dest/$(basename "$run")"
    cp "$run/metrics.json" "$dest/$(basename "$run")/metrics.json"
  done
  runs=()
  for name in $METHODS; do
    for run in "$dest/${name}"_s*/; do [ -f "$run/metrics.json" ] && runs+=("${run%/}"); done
  done
  "$RETAIN" compare "${runs[@]}" --out "$dest"
  exit 0
fi

order=${1:?usage: study.sh ORDER SEED [SEED ...]}
shift
[ $# -gt 0 ] || { echo "give at least one seed" >&2; exit 2; }
for seed in "$@"; do
  for name in $METHODS; do
    out=$RUNS/$order/${name}_s$seed
    [ -f "$out/metrics.json" ] && { echo "done already: $out"; continue; }
    args=$(method_args "$name")
    # shellcheck disable=SC2086
    "$RETAIN" run $args benchmark_order="$order" seed="$seed" \
      output_dir="$out" $EXTRA
  done
done
