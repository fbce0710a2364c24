#!/bin/bash
# The GPU measurements still pending (benchmarks/gpu.md, "Not yet run on a
# GPU"), in one device call after the pieces are staged, most wanted first,
# each bounded in time so that one slow item cannot spend the others' share:
#
#   bash .gpu/run.sh bash benchmarks/gpu_lent/pending.sh
#
# 1. recompute_check.py: --recompute against keeping the activations on the GPU
#    (mixed_float16, without and with XLA), the plain model's run-to-run
#    difference as the noise floor (benchmarks/gpu.md, 2026-11-27).
# 2. The inference target on an H100 (inference.host_tensor's threaded copy
#    is newer than the 0.101 s measured there).
# 3. train.py end to end on the paper configuration (mixed_float16, 160x192x128
#    crops of synthetic cases), without and with --jit_compile, then XLA with
#    the hand-written recompute: seconds per step from epochs 2 and 3 (epochs
#    of CASES steps; one epoch is one pass over the cases).
# On a GPU other than an H100 the inference item goes last (an H200 has it).
#
# Writes $OUT/<name>.json / <name>.log for each item and $OUT/train_*/history.json.
# The sizes can be made small to try the script on a CPU:
#   OUT=/tmp/o SHAPE=48,48,48 CASES=2 TRAIN_FLAGS="--flagfile=configs/smoke.flags \
#     --precision=float32" INFER_FLAGS="--init_filters=8 --repeats=1" \
#     CHECK_FLAGS="--precision=float32 --size=16 --init_filters=8" bash benchmarks/gpu_lent/pending.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPE=${SHAPE:-176,208,144}   # >= the paper's crop 160,192,128
CASES=${CASES:-24}
STEPS=${STEPS:-$CASES}  # <= CASES
TRAIN_FLAGS=${TRAIN_FLAGS:-"--flagfile=configs/brats2018.flags --precision=mixed_float16"}
INFER_FLAGS=${INFER_FLAGS:-"--precision=mixed_float16 --repeats=20"}
CHECK_FLAGS=${CHECK_FLAGS:-"--precision=mixed_float16"}
W=$(mktemp -d)
T0=$(date +%s)
say() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
item() {  # item NAME SECONDS ARGS...   (a python3 command; its log in $OUT/NAME.log)
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  say "=== $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" python3 "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^W0000\|^I0000\|^WARNING: All log\|^E0000\|Sharding callback\|] configuration: " "$OUT/$name.log" | tail -12
  say "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
say "GPU: ${GPU:-none}; host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"

# train.py needs scipy (metrics) and the data tools tqdm: the image has them
# (numpy 2.5.2, scipy 1.18.1 on 2026-11-27).
python3 -c "import numpy, scipy, tqdm; print('numpy', numpy.__version__, 'scipy', scipy.__version__)"

inference() {
  item inference_host_tensor 130 benchmarks/full_volume_inference.py --configs=saved_model:crop \
    --breakdown $INFER_FLAGS --json_out="$OUT/inference_host_tensor.json"
}
for xla in nojit_compile jit_compile; do
  item "recompute_check_$xla" 120 benchmarks/gpu_lent/recompute_check.py --$xla $CHECK_FLAGS
done
case "$GPU" in *H100*) inference ;; esac

say "=== data: $CASES synthetic cases of $SHAPE"
timeout 90 python3 -m data_pipeline.synthetic --output_dir "$W/nifti" --num_cases "$CASES" --seed 0 \
  --shape "$SHAPE" > "$OUT/data.log" 2>&1 &&
timeout 90 python3 -m data_pipeline.convert --input_dir "$W/nifti" --output_dir "$W/tfrecord" \
  --folds 2 --seed 0 >> "$OUT/data.log" 2>&1
say "data: rc=$? $(du -sh "$W/tfrecord" | cut -f1)"

train() {  # train NAME SECONDS EXTRA_FLAGS...
  local name=$1 limit=$2; shift 2
  item "$name" "$limit" train.py $TRAIN_FLAGS --data_dir="$W/tfrecord" --model_dir="$W/$name" \
    --fold=-1 --validate_every=0 --epochs=3 --steps_per_epoch="$STEPS" --noexport "$@"
  mkdir -p "$OUT/$name" && cp "$W/$name"/*.json "$OUT/$name/" 2>/dev/null
  grep -o "epoch [0-9]/3 .*seconds [0-9.]*  loss [0-9.]*  dice [0-9.]*" "$OUT/$name.log" | sed "s/^/  $name: /"
}
train train_plain 110
train train_xla 150 --jit_compile
train train_xla_recompute 150 --jit_compile --recompute

case "$GPU" in *H100*) ;; *) inference ;; esac
say "done"
