"""Profiles one training step op by op (TF profiler trace, aggregated by op type).

  python benchmarks/profile_step.py --crop=64,64,64 [--top=25]

Prints the share of the step's CPU time spent in each TensorFlow op type
(Conv3D, Conv3DBackpropFilterV2, Sum, Mul, ...), from the host XPlane of a
profiler trace of two steps after a warm-up step: the first thing to read
before optimising anything (issue 6).
"""

from __future__ import annotations

import collections
import glob
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("crop", ["64", "64", "64"], "Crop D,H,W (divisible by 16).")
flags.DEFINE_integer("init_filters", 32, "Network width.", lower_bound=8)
flags.DEFINE_integer("top", 25, "Op types to print.", lower_bound=1)


def main(argv):
    del argv
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from brats_tf import losses
    from brats_tf.config import ModelConfig
    from brats_tf.model import build_model

    crop = tuple(int(c) for c in FLAGS.crop)
    model = build_model(ModelConfig(input_shape=crop, init_filters=FLAGS.init_filters))
    optimizer = keras.optimizers.Adam(1e-4)
    rng = np.random.default_rng(0)
    image = tf.constant(rng.normal(size=(1,) + crop + (4,)).astype(np.float32))
    labels = tf.constant((rng.random((1,) + crop + (3,)) > 0.9).astype(np.float32))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = model(image, training=True)
            loss = losses.reduce_per_example(losses.total_loss(labels, image, out)["loss"], 1)
            loss += tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    import time

    step().numpy()
    t = time.perf_counter()
    step().numpy()
    print(f"one step: {time.perf_counter() - t:.2f} s wall")
    logdir = tempfile.mkdtemp(prefix="brats_profile_")
    tf.profiler.experimental.start(logdir)
    for _ in range(2):
        step().numpy()
    tf.profiler.experimental.stop()
    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals: collections.Counter = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                # TF op events are named "<op name>:<op type>".
                if ":" not in name or name.startswith(("$", "Executor", "Thread")):
                    continue
                op_type = name.rsplit(":", 1)[-1]
                if op_type.startswith("__inference") or op_type == "Run":
                    continue  # the whole function call, not an op
                totals[op_type] += event.duration_ps
    total = sum(totals.values())
    print(f"op time over 2 steps, crop {crop}, width {FLAGS.init_filters}: {total / 1e12:.2f} s "
          f"(summed over threads)")
    for op, ps in totals.most_common(FLAGS.top):
        print(f"  {op:40s} {ps / 1e12:8.3f} s  {100 * ps / total:5.1f}%")


if __name__ == "__main__":
    app.run(main)
