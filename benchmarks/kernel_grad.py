"""Times the kernel gradient of each 3x3x3 stride-1 convolution shape of the
paper network: TensorFlow's Conv3DBackpropFilterV2 (oneDNN on x86) against
brats_tf.conv_grad's single matrix product, with the forward convolution and
the input gradient for scale, and checks that both gradients agree.

  python benchmarks/kernel_grad.py                 # shapes of a 64^3 crop
  python benchmarks/kernel_grad.py --crop=160,192,128 --repeats=3

Each row: level, volume, channels, milliseconds and GFLOP/s of each op, and
whether brats_tf's training uses the matrix product there on this machine
(conv_grad.use_matmul: the CPU's kind, then conv_grad.applies). Those rules
come from this benchmark: the product on x86 CPUs with AVX2 and without
AVX-512 (1.2-1.7x faster than oneDNN's on the AVX2 AMD EPYC of issue 6,
1.5x slower on an AVX-512 Xeon), for 16+ input channels and a padded grid
at most 1.5x the volume.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # see brats_tf/__init__.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("crop", ["64", "64", "64"], "Crop D,H,W (divisible by 8).")
flags.DEFINE_integer("init_filters", 32, "Network width.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed calls per op (the median is printed).", lower_bound=1)


def main(argv):
    del argv
    import tensorflow as tf

    from benchmarks.machine import describe, median_seconds
    from brats_tf import conv_grad

    crop = [int(v) for v in FLAGS.crop]
    print(f"machine: {describe()}")
    print(f"{'level':>5} {'volume':>12} {'ch':>4}   {'forward':>15} {'input grad':>15} "
          f"{'kernel grad TF':>15} {'kernel grad mm':>15}  used  max rel diff")
    shapes = [(0, crop, 4, FLAGS.init_filters)]  # the stem
    for level in range(4):
        channels = FLAGS.init_filters * 2 ** level
        shapes.append((level, [s // 2 ** level for s in crop], channels, channels))
    for level, volume, cin, cout in shapes:
        x = tf.random.normal([1, *volume, cin])
        dy = tf.random.normal([1, *volume, cout])
        kernel = tf.random.normal([3, 3, 3, cin, cout])
        flop = 2 * 27 * cin * cout * volume[0] * volume[1] * volume[2]
        # autograph=False: autograph re-parses a lambda's source and can take
        # another lambda of the same statement for it.
        ops = {name: tf.function(fn, autograph=False) for name, fn in {
            "forward": lambda: tf.nn.conv3d(x, kernel, [1] * 5, "SAME"),
            "input": lambda: tf.raw_ops.Conv3DBackpropInputV2(
                input_sizes=x.shape, filter=kernel, out_backprop=dy, strides=[1] * 5,
                padding="SAME"),
            "native": lambda: tf.raw_ops.Conv3DBackpropFilterV2(
                input=x, filter_sizes=kernel.shape, out_backprop=dy, strides=[1] * 5,
                padding="SAME"),
            "matmul": lambda: conv_grad.conv3d_kernel_grad(x, dy),
        }.items()}
        cells = []
        for fn in ops.values():
            seconds = median_seconds(fn, FLAGS.repeats)
            cells.append(f"{seconds * 1e3:7.1f} ms {flop / seconds / 1e9:4.0f}")
        native, matmul = ops["native"]().numpy(), ops["matmul"]().numpy()
        diff = abs(native - matmul).max() / abs(native).max()
        used = "yes" if conv_grad.use_matmul(x, kernel.shape) else "no"
        print(f"{level + 1:>5} {'x'.join(map(str, volume)):>12} {cin:>4}   "
              f"{'  '.join(cells)}  {used:>4}  {diff:.1e}", flush=True)
    print(f"(ms per call, median of --repeats, then GFLOP/s; used: whether training uses "
          f"the matrix product there on this machine: mode "
          f"{conv_grad.kernel_gradient_mode()!r}, BRATS_TF_KERNEL_GRADIENT)")


if __name__ == "__main__":
    app.run(main)
