#!/bin/bash
# Packs TensorFlow 2.21 (Python 3.12, CUDA 12 build) for a lent GPU machine
# whose image has Python 3.12 and CUDA 13 but no TensorFlow, in pieces small
# enough for a tool that carries 64 MiB per call (benchmarks/gpu.md).
#
#   bash benchmarks/gpu_lent/pack.sh [OUT_DIR]     # default .gpu (git-ignore it)
#
# Writes OUT_DIR/c01, c02, ... (one xz-compressed tar of the TensorFlow wheel
# without its C++ headers, split in 58 MiB pieces), OUT_DIR/deps.tar.xz
# (Keras and TensorFlow's pure-Python needs, the CUDA 12 runtime
# libcudart.so.12, and empty stand-ins for libcufft.so.11, libcusolver.so.11
# and libcusparse.so.12: TensorFlow wants to open them before it registers a
# GPU, and this network calls none of them) and OUT_DIR/run.sh. cuBLAS and
# cuDNN come from the machine's CUDA 13 image (run.sh links them).
# Needs: pip with access to PyPI, unzip, xz, gcc. About 10 minutes on 2 cores.
set -euo pipefail
OUT=$(realpath -m "${1:-.gpu}")
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any"
PIP="python3 -m pip download -q --no-deps $PLAT"
echo "pack: downloading the wheels into $W"
$PIP -d "$W/tf" tensorflow==2.21.0
$PIP -d "$W/deps" keras==3.15.1 optree==0.20.0 namex==0.1.0 absl-py==2.5.1 astunparse==1.6.3 \
    gast==0.7.0 google-pasta==0.2.0 termcolor==3.3.0 wrapt==2.5.2 opt_einsum==3.4.0 \
    flatbuffers==25.12.19 nibabel==5.4.2 tensorboard==2.21.0 tensorboard-data-server==0.7.2 \
    protobuf==7.36.2 ml_dtypes==0.6.0
$PIP -d "$W/cuda" 'nvidia-cuda-runtime-cu12<13'
echo "pack: TensorFlow without include/ -> xz (the slow part)"
mkdir -p "$W/x/tf" "$W/x/site_deps" "$W/x/libs" "$OUT"
unzip -q "$W"/tf/tensorflow-*.whl -d "$W/x/tf"
rm -rf "$W/x/tf/tensorflow/include"
tar cf - -C "$W/x/tf" . | xz -T0 -6 > "$W/tf.tar.xz"
rm -f "$OUT"/c[0-9][0-9]
split -b 58M -d -a 2 --numeric-suffixes=1 "$W/tf.tar.xz" "$OUT/c"
for whl in "$W"/deps/*.whl; do unzip -q -o "$whl" -d "$W/x/site_deps"; done
unzip -q -j -o "$W"/cuda/nvidia_cuda_runtime*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$W/x/libs"
echo 'int brats_tf_stub_unused(void) { return 0; }' > "$W/stub.c"
for so in libcufft.so.11 libcusolver.so.11 libcusparse.so.12; do
  gcc -shared -fPIC -o "$W/x/libs/$so" -Wl,-soname,"$so" "$W/stub.c"
done
tar cf - -C "$W/x" site_deps libs | xz -T0 -6 > "$OUT/deps.tar.xz.tmp"
mv "$OUT/deps.tar.xz.tmp" "$OUT/deps.tar.xz"
cp "$HERE/run_on_device.sh" "$OUT/run.sh"
ls -la "$OUT"
