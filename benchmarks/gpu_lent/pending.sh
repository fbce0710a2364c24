#!/bin/bash
# The GPU measurements still pending (benchmarks/gpu.md, "Not yet run on a
# GPU"), in one device call after the pieces are staged, most wanted first,
# each bounded in time so that one slow item cannot spend the others' share:
#
#   bash .gpu/run.sh bash benchmarks/gpu_lent/pending.sh
#
# Writes $OUT/<name>.json and $OUT/<name>.log for each item.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
item() {  # item NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" python3 "$@" --json_out="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^W0000\|^I0000\|^WARNING: All log" "$OUT/$name.log" | tail -25
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
item inference_parts 220 benchmarks/full_volume_inference.py --configs=saved_model:crop,keras:crop \
  --precision=mixed_float16 --repeats=20 --breakdown
item step_recompute4_cap16000mb 140 benchmarks/model_step.py --crops=160,192,128 \
  --precision=mixed_float16 --recompute_levels=4 --gpu_memory_limit_mb=16000 --steps=10 --warmup=2
item step_xla 120 benchmarks/model_step.py --crops=160,192,128 --precision=mixed_float16 \
  --jit_compile --steps=10 --warmup=2
# The host CPU's float16 / bfloat16 convolution accuracy (tests/reduced_precision.py).
echo "=== host CPU: $(grep -m1 'model name' /proc/cpuinfo)"
grep -o -m1 'avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
CUDA_VISIBLE_DEVICES= timeout 40 python3 -c "
import sys; sys.path.insert(0, 'tests')
from reduced_precision import slack
print('reduced_precision.slack:', {d: slack(d) for d in ('bfloat16', 'float16')})" 2>&1 | tail -1
