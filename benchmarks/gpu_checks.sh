#!/usr/bin/env bash
# The GPU checks, as one script to run whenever a GPU machine is available (docs/results.md, "GPU figures").
# Run from the repository root after `make install` (or any environment with retain installed):
#
#   bash benchmarks/gpu_checks.sh            # writes $OUT/*.json and $OUT/*.log (default bench-out/gpu)
#
# 1. bf16: a 2-task seq run on SmolLM2 with bf16 autocast and bf16 weights; then ilora.
# 2. 4-bit QLoRA: the same runs on a 4-bit nf4 base (bitsandbytes on CUDA).
# 3. step-time table: seq, ilora (split and joined passes), replay, ewc, lwf, olora at 4 tasks, gem, agem;
#    medians over 5 repeats, peak memory from the CUDA allocator.
# 4. two-GPU DDP (only with 2 GPUs): a 2-task seq and ilora run under torchrun, against one GPU.
# About 15 minutes on one H100-class GPU.
set -euo pipefail

RETAIN=${RETAIN:-retain}
OUT=${OUT:-bench-out/gpu}
MODEL=${MODEL:-smollm2-135m-instruct}
mkdir -p "$OUT"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "no CUDA device" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" || true

run() {  # NAME then key=value overrides of examples/lnt_short1.yaml (2 tasks, small rows)
  local name=$1; shift
  "$RETAIN" run examples/lnt_short1.yaml model_name_or_path="$MODEL" benchmark_order=short1 \
    max_samples=64 eval_max_samples=32 output_dir="$OUT/runs/$name" "$@" > "$OUT/$name.log" 2>&1
  python - "$OUT/runs/$name/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: last={m['last']:.3f} avg={m['avg']:.3f} wall={m['wall_time_s']}s")
EOF
}

# 1. bf16
run seq_bf16 bf16=true torch_dtype=bfloat16
run ilora_bf16 cl_method=ilora bf16=true torch_dtype=bfloat16
# 2. 4-bit nf4 QLoRA
run seq_4bit quantization_bit=4 bf16=true
run ilora_4bit cl_method=ilora quantization_bit=4 bf16=true
# 3. step time and peak memory, side by side
"$RETAIN" bench step-time --model "$MODEL" --device cuda --tasks agnews,SST-2,MNLI,COPA \
  --methods seq,ilora,ilora_joined,replay,ewc,lwf,olora,gem,agem --batch-size 8 --cutoff-len 256 \
  --repeats 5 --warmup 2 --json "$OUT/step_time_gpu.json" | tee "$OUT/step_time_gpu.txt"
# 4. two GPUs: DDP against one
if [ "$GPUS" -ge 2 ]; then
  for method in seq ilora; do
    torchrun --nproc_per_node 2 -m retain run examples/lnt_short1.yaml model_name_or_path="$MODEL" \
      cl_method=$method max_samples=64 eval_max_samples=32 per_device_train_batch_size=4 \
      logging_steps=1 output_dir="$OUT/runs/${method}_ddp2" > "$OUT/${method}_ddp2.log" 2>&1
    run "${method}_gpu1" cl_method=$method per_device_train_batch_size=8 logging_steps=1
  done
fi
echo "done: $OUT"
