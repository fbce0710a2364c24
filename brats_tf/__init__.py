"""brats_tf: Myronenko's BraTS 2018 winning network (arXiv:1810.11654) in TensorFlow 2 / Keras 3."""

import os as _os

# TensorFlow's x86 wheels switch on oneDNN's CPU kernels by default only on
# CPUs with AVX512-VNNI, AVX512-BF16 or AMX. Elsewhere (an AMD EPYC with AVX2,
# an older Xeon) Conv3D and its gradients fall back to Eigen, 2-8x slower,
# and a training step runs at ~40% of what the same CPU does with oneDNN
# (WORKSPACE.md deviation 23). TensorFlow reads the switch once, when it
# loads, so it only helps when brats_tf (or an entry point: train.py,
# evaluate.py, the benchmarks, which set it themselves) comes first;
# TF_ENABLE_ONEDNN_OPTS=0 in the environment keeps TensorFlow's choice.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
