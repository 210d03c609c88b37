#!/usr/bin/env bash
# The published performance figures (docs/results.md), in the order of benchmarks/README.md.
# Each command prints its table and writes its JSON (raw samples, medians, ratios, machine) into
# $OUT. Run from the repository root (LNT: the copy shipped with retain, or LNT=/path), on an
# otherwise idle machine: timings taken while other jobs share the cores are noisier (the ratios,
# measured side by side, suffer least).
#
#   bash benchmarks/published.sh                 # the four main ones (about 2.5 hours on 2 CPU cores)
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
    step-time)  # about 70 min: every method beside seq (2, 4 and 8 tasks), 1 thread, as in docs/results.md
      st=("$RETAIN" bench step-time --model smollm2-135m-instruct ${LNT:+--benchmark-dir "$LNT"} \
        --batch-size 8 --cutoff-len 128 --warmup 1 --memory-repeats 1 --threads 1)
      "${st[@]}" --repeats 3 --tasks agnews,MNLI --methods seq,replay,ilora,ilora_joined,peft \
        --json "$OUT/step_time_smollm2.json"
      "${st[@]}" --repeats 5 --tasks agnews,MNLI --methods seq,ewc,lwf,agem,gem,multitask \
        --json "$OUT/step_time_smollm2_regularisers.json"
      "${st[@]}" --repeats 5 --tasks MNLI,CB,WiC,COPA --methods seq,olora,nlora,inflora,gem \
        --json "$OUT/step_time_smollm2_4tasks.json"
      "${st[@]}" --repeats 3 --tasks agnews,MNLI --methods seq,lamol,pseudo_replay,ssr \
        --json "$OUT/step_time_smollm2_rehearsal.json"
      "${st[@]}" --repeats 3 --tasks MNLI,CB,WiC,COPA,QQP,RTE,agnews,SST-2 --methods seq,gem \
        --json "$OUT/step_time_smollm2_8tasks.json" ;;
    eval)       # about 15 min: LNT short1, 50 test rows per task, as in examples/lnt_short1.yaml
      "$RETAIN" bench eval --model smollm2-135m-instruct ${LNT:+--benchmark-dir "$LNT"} \
        --tasks agnews,SST-2,MNLI,COPA --rows 50 --batch-size 16 --repeats 3 --warmup 1 \
        --json "$OUT/eval_smollm2_short1.json" ;;
    scaling)    # about 25 min: seq and ilora x (2 + 4 + 8 tasks), 1 repeat after a T=2 warm-up
      "$RETAIN" bench scaling --model smollm2-135m-instruct --lengths 2 4 8 \
        --methods seq,ilora --rows 32 --test-rows 8 --cutoff-len 128 --eval-scope all --repeats 1 --warmup 1 --threads 1 \
        --json "$OUT/scaling_smollm2.json" ;;
    scaling-full)  # about 3 hours: all 4 methods, 3 repeats
      "$RETAIN" bench scaling --model smollm2-135m-instruct --lengths 2 4 8 \
        --methods seq,replay,ilora,peft --rows 32 --test-rows 8 --cutoff-len 128 --eval-scope all --repeats 3 --warmup 1 \
        --json "$OUT/scaling_smollm2_full.json" ;;
    cil)        # about 15 min: MiniLM, peft with Linear heads and NewLoRA, LNT order1's first 8 tasks
      "$RETAIN" bench cil --model all-minilm-l6-v2 --data lnt ${LNT:+--benchmark-dir "$LNT"} --order order1 \
        --tasks 2 4 8 --train-rows 200 --rows 200 --epochs 1 --repeats 3 --warmup 1 --threads 1 \
        --json "$OUT/cil_minilm_lnt.json" ;;
    cil-soft)   # about 20 min: the same at 2 and 4 tasks with all three routings (as published)
      "$RETAIN" bench cil --model all-minilm-l6-v2 --data lnt ${LNT:+--benchmark-dir "$LNT"} --order order1 \
        --tasks 2 4 --train-rows 200 --rows 200 --epochs 1 --repeats 3 --warmup 1 --threads 1 \
        --json "$OUT/cil_minilm_lnt_soft.json" ;;
    write)      # about 15 min: pseudo-row writing from an LNT dbpedia prompt, both prefix caches
      "$RETAIN" bench write --model smollm2-135m-instruct ${LNT:+--benchmark-dir "$LNT"} \
        --tasks dbpedia --rows 16 --batch-size 16 --repeats 3 --warmup 1 --threads 1 \
        --json "$OUT/write_smollm2.json" ;;
    *) echo "unknown benchmark '$name' (step-time, eval, scaling, scaling-full, cil, cil-soft, write)" >&2; exit 2 ;;
  esac
done
