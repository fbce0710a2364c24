"""Would Winograd convolutions written in TensorFlow ops make CPU inference
faster? Times a 3x3x3 'same' convolution of each level of the inference
network at the brain box of a BraTS case (136x184x136, width 32) two ways:

* ``direct``: ``tf.nn.conv3d`` (oneDNN's kernel on x86);
* ``winograd``: Winograd's minimal filtering F(2x2x2, 3x3x3) in plain
  TensorFlow ops: the input cut into overlapping 4^3 tiles and transformed
  one axis at a time (strided slices, sums, stacks), 64 matrix products
  [tiles, Cin] x [Cin, Cout] in one batched product, and the inverse
  transform. 64 instead of 216 multiplications per 2^3 outputs: 3.4x fewer
  FLOPs in the products.

and checks that both agree (max |difference| / max |direct|, float32).

  python benchmarks/winograd.py
  python benchmarks/winograd.py --volume=136,184,136 --init_filters=32 --repeats=5

Why it exists (issue 6): the full-volume inference target (<= 15 s on the
2-core CPU) is not met on the AVX2 EPYC, where the ~1.9 TFLOP of the
network's convolutions alone take 13-18 s at its matrix-product speed; only
fewer FLOPs would meet it. This benchmark measured whether that is within
reach without a custom C++ op. It is not (2026-11-27, AMD EPYC, 2 cores,
AVX2; medians of 5, two runs): 1.08-1.09x at the coarsest level (17x23x17,
256 channels), 0.98-1.00x at 128 channels, 0.42-0.49x at 64 and 0.30-0.45x
at full resolution (32); max relative difference 1-3e-6. The
transforms are memory-bound: TensorFlow runs each slice, sum and stack as a
separate pass over a tensor 2-8x the input's size, which costs more than
the products save. A Winograd kernel that transforms a cache-sized block at
a time (a custom op, or oneDNN's, which has Winograd only for 2-D
convolutions on AVX-512) would be needed; brats_tf does not ship one.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # see brats_tf/__init__.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("volume", ["136", "184", "136"], "Full-resolution volume D,H,W of the "
                  "network input (divisible by 8; default: the benchmark case's brain box).")
flags.DEFINE_integer("init_filters", 32, "Network width (the paper: 32).", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed calls per op (the median is printed).", lower_bound=1)

# F(2, 3): Y = A^T [(G g) * (B^T d)], per axis (Lavin & Gray, 2016).
_G = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]


def kernel_transform(kernel):
    """[3, 3, 3, Cin, Cout] -> [64, Cin, Cout]: G g G^T along each axis, in
    the (W, H, D) component order that ``input_transform`` stacks."""
    import numpy as np

    g = np.asarray(_G)
    u = np.einsum("ai,bj,ck,ijkxy->cbaxy", g, g, g, np.asarray(kernel, np.float64))
    return u.reshape(64, *u.shape[3:]).astype(np.float32)


def _axis_transform(x, axis: int):
    """B^T d along ``axis`` (length 2T + 2) for T tiles of 4 with stride 2;
    the 4 components stacked on a new axis 0."""
    import tensorflow as tf

    pairs = x.shape[axis] // 2
    x = tf.reshape(x, [*x.shape[:axis], pairs, 2, *x.shape[axis + 1:]])
    lead = (slice(None),) * axis
    d0, d1 = x[lead + (slice(0, pairs - 1), 0)], x[lead + (slice(0, pairs - 1), 1)]
    d2, d3 = x[lead + (slice(1, pairs), 0)], x[lead + (slice(1, pairs), 1)]
    return tf.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3], 0)


def winograd_conv3d(x, u):
    """'same' 3x3x3 convolution of x ([D, H, W, Cin]) with the transformed
    kernel u ([64, Cin, Cout], ``kernel_transform``)."""
    import tensorflow as tf

    depth, height, width, channels = x.shape
    td, th, tw = (depth + 1) // 2, (height + 1) // 2, (width + 1) // 2
    xp = tf.pad(x, [[1, 2 * td + 1 - depth], [1, 2 * th + 1 - height],
                    [1, 2 * tw + 1 - width], [0, 0]])
    v = _axis_transform(xp, 0)                    # [4d, td, Hp, Wp, C]
    v = _axis_transform(v, 2)                     # [4h, 4d, td, th, Wp, C]
    v = _axis_transform(v, 4)                     # [4w, 4h, 4d, td, th, tw, C]
    tiles, out = td * th * tw, u.shape[-1]
    m = tf.matmul(tf.reshape(v, [64, tiles, channels]), u)   # [64, tiles, Cout]
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] along w, then h, then d.
    a = tf.reshape(m, [4, 16 * tiles * out])
    a = tf.stack([a[0] + a[1] + a[2], a[1] - a[2] - a[3]], 0)
    a = tf.reshape(a, [2, 4, 4 * tiles * out])
    a = tf.stack([a[:, 0] + a[:, 1] + a[:, 2], a[:, 1] - a[:, 2] - a[:, 3]], 1)
    a = tf.reshape(a, [2, 2, 4, tiles * out])
    a = tf.stack([a[:, :, 0] + a[:, :, 1] + a[:, :, 2], a[:, :, 1] - a[:, :, 2] - a[:, :, 3]], 2)
    a = tf.reshape(a, [2, 2, 2, td, th, tw, out])           # w, h, d, tiles
    y = tf.reshape(tf.transpose(a, [3, 2, 4, 1, 5, 0, 6]), [2 * td, 2 * th, 2 * tw, out])
    return y[:depth, :height, :width]


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from benchmarks.machine import describe, median_seconds

    volume = [int(v) for v in FLAGS.volume]
    if len(volume) != 3 or any(v % 8 for v in volume):
        raise app.UsageError(f"--volume: three sizes divisible by 8, got {FLAGS.volume}")
    print(f"machine: {describe()}")
    print(f"{'level':>5} {'volume':>12} {'ch':>4}  {'direct':>16}  {'winograd':>16}  "
          f"speed-up  max rel diff")
    rng = np.random.default_rng(0)
    for level in range(4):
        shape = [v // 2**level for v in volume]
        channels = FLAGS.init_filters * 2**level
        # a ReLU output, as the convolutions' inputs in the network's blocks
        x = tf.constant(np.maximum(rng.standard_normal([*shape, channels]), 0).astype(np.float32))
        kernel = (rng.standard_normal([3, 3, 3, channels, channels])
                  / np.sqrt(27 * channels)).astype(np.float32)
        k, u = tf.constant(kernel), tf.constant(kernel_transform(kernel))
        flop = 2 * 27 * channels**2 * np.prod(shape)
        direct = tf.function(lambda: tf.nn.conv3d(x[None], k, [1] * 5, "SAME")[0],
                             autograph=False)
        winograd = tf.function(lambda: winograd_conv3d(x, u), autograph=False)
        ref, out = direct().numpy(), winograd().numpy()
        diff = np.abs(out - ref).max() / np.abs(ref).max()
        sd = median_seconds(direct, FLAGS.repeats)
        sw = median_seconds(winograd, FLAGS.repeats)
        print(f"{level:>5} {'x'.join(map(str, shape)):>12} {channels:>4}  "
              f"{sd * 1e3:8.1f} ms {flop / sd / 1e9:4.0f}  {sw * 1e3:8.1f} ms {flop / sw / 1e9:4.0f}"
              f"  {sd / sw:7.2f}x  {diff:.1e}", flush=True)
    print("(ms per call, median of --repeats; then GFLOP/s counted as the direct "
          "convolution's FLOPs)")


if __name__ == "__main__":
    app.run(main)
