#!/bin/bash
# Runs on the lent GPU machine, from the repository root, after the pieces of
# benchmarks/gpu_lent/pack.sh have been moved there into /tmp/stage (one
# call each: `mkdir -p /tmp/stage && mv .gpu/cNN /tmp/stage/`, carrying
# .gpu/cNN). The first call of this script carries .gpu/run.sh and
# .gpu/deps.tar.xz; it unpacks to /tmp/g (kept while the machine stays warm).
#
#   bash .gpu/run.sh [sanity]        unpack, then check TensorFlow's GPU ops
#                                    against its CPU ops (conv3d, matmul)
#   bash .gpu/run.sh CMD ARGS...     run CMD with TensorFlow set up
#
# TensorFlow 2.21 is built for CUDA 12: it gets the CUDA 12 runtime and the
# stand-ins from deps.tar.xz, and cuBLAS 13 (linked under the .so.12 names)
# and cuDNN 9 of the image.
set -u
ROOT=$(pwd); OUT=${OUT:-/tmp/out}; G=/tmp/g
t0=$(date +%s); log() { echo "[+$(( $(date +%s) - t0 ))s] $*"; }
if [ ! -d $G/tf/tensorflow ]; then
  mkdir -p $G && ls -la /tmp/stage | head -20
  if command -v xz >/dev/null; then UNXZ="xz -dc -T0"; else UNXZ="python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1<<22)'"; fi
  mkdir -p $G/tf && cat /tmp/stage/c* | eval $UNXZ | tar x -C $G/tf || { log "unpack failed"; exit 3; }
  cat .gpu/deps.tar.xz | eval $UNXZ | tar x -C $G/ || { log "deps unpack failed"; exit 3; }
fi
log unpacked; du -sh $G/tf $G/site_deps
find1() { find /opt /usr/local /usr/lib -name "$1" 2>/dev/null | head -1; }
CUBLAS=$(find1 libcublas.so.13); CUBLASLT=$(find1 libcublasLt.so.13); CUDNN=$(find1 libcudnn.so.9)
NVRTC=$(find1 libnvrtc.so.13); JIT=$(find1 libnvJitLink.so.13)
echo "cublas13=$CUBLAS cublasLt13=$CUBLASLT cudnn9=$CUDNN nvrtc13=$NVRTC nvjitlink13=$JIT"
[ "${1:-sanity}" = sanity ] && ls $(dirname "$CUDNN")
ln -sf "$CUBLAS" $G/libs/libcublas.so.12; ln -sf "$CUBLASLT" $G/libs/libcublasLt.so.12
export LD_LIBRARY_PATH=$G/libs:$(dirname "$CUDNN"):$(dirname "$CUBLAS"):$(dirname "$NVRTC"):$(dirname "$JIT")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
CUDA13=$(ls -d /usr/local/cuda-13* 2>/dev/null | head -1); [ -n "$CUDA13" ] && export PATH=$PATH:$CUDA13/bin XLA_FLAGS=--xla_gpu_cuda_data_dir=$CUDA13
export PYTHONPATH=$G/site_deps:$G/tf:$ROOT${EXTRA_PP:+:$EXTRA_PP} PYTHONUNBUFFERED=1
if [ "${1:-sanity}" = sanity ]; then
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 - <<'PY' || { log "sanity check failed"; exit 4; }
import time, numpy as np, tensorflow as tf
print("tf", tf.__version__, tf.sysconfig.get_build_info().get("cuda_version"), tf.sysconfig.get_build_info().get("cudnn_version"))
gpus = tf.config.list_physical_devices("GPU"); print("GPUs", gpus)
assert gpus, "TensorFlow sees no GPU"
x = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 4)).astype(np.float32)
k = np.random.default_rng(1).normal(size=(3, 3, 3, 4, 8)).astype(np.float32)
a = np.random.default_rng(2).normal(size=(256, 256)).astype(np.float32)
for dev in ("GPU:0", "CPU:0"):
    with tf.device(dev):
        y = tf.nn.conv3d(x, k, [1] * 5, "SAME"); m = tf.linalg.matmul(a, a)
        print(dev, "conv3d", float(tf.reduce_sum(y)), "matmul", float(tf.reduce_sum(m)), y.device)
PY
log sanity ok
else
  "$@"
fi
