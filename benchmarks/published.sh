#!/usr/bin/env bash
# The published performance figures (docs/results.md), in the order of benchmarks/README.md.
# Each command prints its table and writes its JSON (raw samples, medians, ratios, machine) into
# $OUT. Run from the repository root (LNT: the copy shipped with retain, or LNT=/path), on an
# otherwise idle machine: timings taken while other jobs share the cores are noisier (the ratios,
# measured side by side, suffer least).
#
#   bash benchmarks/published.sh                 # the four published (about 1.5 hours on 2 CPU cores)
#   bash benchmarks/published.sh step-time eval  # some of them
set -euo pipefail

RETAIN=${RETAIN:-retain}
OUT=${OUT:-benchmarks/results}
LNT=${LNT:-}  # empty: the LNT copy shipped with retain
mkdir -p "$OUT"
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(step-time eval scaling cil)

for name in "${which[@]}"; do
  case "$name" in
    step-time)  # about 10 min: 4 methods + I-LoRA's 2 floor components, 1 + 5 rounds, 2 memory rounds
      "$RETAIN" bench step-time --model smollm2-135m-instruct ${LNT:+--benchmark-dir "$LNT"} \
        --tasks agnews,MNLI --batch-size 8 --cutoff-len 128 --repeats 5 --warmup 1 \
        --json "$OUT/step_time_smollm2.json" ;;
    eval)       # about 15 min: LNT short1, 50 test rows per task, as in examples/lnt_short1.yaml
      "$RETAIN" bench eval --model smollm2-135m-instruct ${LNT:+--benchmark-dir "$LNT"} \
        --tasks agnews,SST-2,MNLI,COPA --rows 50 --batch-size 16 --repeats 3 --warmup 1 \
        --json "$OUT/eval_smollm2_short1.json" ;;
    scaling)    # about 25 min: seq and ilora x (2 + 4 + 8 tasks), 1 repeat after a T=2 warm-up
      "$RETAIN" bench scaling --model smollm2-135m-instruct --lengths 2 4 8 \
        --methods seq,ilora --rows 32 --test-rows 8 --eval-scope all --repeats 1 --warmup 1 --threads 1 \
        --json "$OUT/scaling_smollm2.json" ;;
    scaling-full)  # about 3 hours: all 4 methods, 3 repeats
      "$RETAIN" bench scaling --model smollm2-135m-instruct --lengths 2 4 8 \
        --methods seq,replay,ilora,peft --rows 32 --test-rows 8 --eval-scope all --repeats 3 --warmup 1 \
        --json "$OUT/scaling_smollm2_full.json" ;;
    cil)        # about 15 min: MiniLM, peft with Linear heads and NewLoRA, LNT order1's first 8 tasks
      "$RETAIN" bench cil --model all-minilm-l6-v2 --data lnt ${LNT:+--benchmark-dir "$LNT"} --order order1 \
        --tasks 2 4 8 --train-rows 500 --rows 200 --epochs 2 --repeats 3 --warmup 1 \
        --json "$OUT/cil_minilm_lnt.json" ;;
    *) echo "unknown benchmark '$name' (step-time, eval, scaling, scaling-full, cil)" >&2; exit 2 ;;
  esac
done
