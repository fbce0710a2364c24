"""Training step with and without XLA-fused GroupNorm tails, interleaved in one process.

  python benchmarks/fused_elementwise.py --crop=64,64,64 --pairs=10
  python benchmarks/fused_elementwise.py --crop=160,192,128 --pairs=6

Traces the training step of the paper's network twice, once with
BRATS_TF_FUSED_ELEMENTWISE=off (GroupNorm's elementwise tails as TensorFlow
ops, a pass over memory each) and once with =on (each tail one
XLA-compiled loop, ``brats_tf.layers._fused``; WORKSPACE.md deviation 26),
then times the two steps alternately, ``--pairs`` times (off then on, then
on then off, ...: neither is always the one after the other). On a shared host whose
speed drifts by 10-30% within minutes (README, Benchmarks), runs of
model_step.py minutes apart cannot resolve a 5% change; steps side by side in
one process can: the paired ratio (on / off per pair, its median) is the
figure to read.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # see brats_tf/__init__.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("crop", ["64", "64", "64"], "Crop D,H,W (divisible by 16).")
flags.DEFINE_integer("init_filters", 32, "Network width (the paper: 32).", lower_bound=8)
flags.DEFINE_integer("pairs", 5, "Timed (off, on) pairs of steps.", lower_bound=1)
flags.DEFINE_integer("recompute_levels", 0, "Gradient checkpointing of the finest levels' "
                     "blocks, as train.py --recompute.", lower_bound=0)

_ENV = "BRATS_TF_FUSED_ELEMENTWISE"


def main(argv):
    del argv
    import numpy as np

    from benchmarks.machine import paper_training_step
    from brats_tf.training import set_inter_op_threads

    set_inter_op_threads(None, recompute=FLAGS.recompute_levels > 0)  # as train.py
    try:
        crop = tuple(int(c) for c in FLAGS.crop)
        _, make_step = paper_training_step(crop, FLAGS.init_filters, FLAGS.recompute_levels)
    except ValueError as e:  # one line, no traceback
        sys.exit(f"fused_elementwise.py: --crop={','.join(FLAGS.crop)}: {e}")

    steps = {}
    for mode in ("off", "on"):  # the variable is read when the step is traced
        os.environ[_ENV] = mode
        steps[mode] = make_step()
        t = time.perf_counter()
        steps[mode]().numpy()
        print(f"{mode}: first step (tracing, XLA compiles) {time.perf_counter() - t:.1f} s",
              flush=True)
    times = {"off": [], "on": []}
    for i in range(FLAGS.pairs):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            t = time.perf_counter()
            steps[mode]().numpy()
            times[mode].append(time.perf_counter() - t)
        print(f"pair {i + 1}/{FLAGS.pairs}: off {times['off'][-1]:.3f} s, "
              f"on {times['on'][-1]:.3f} s", flush=True)
    ratios = [b / a for a, b in zip(times["off"], times["on"])]
    print(f"crop {crop}, width {FLAGS.init_filters}, recompute_levels {FLAGS.recompute_levels}: "
          f"median off {np.median(times['off']):.3f} s, on {np.median(times['on']):.3f} s; "
          f"on / off per pair: median {np.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    app.run(main)
