"""Does --recompute give the same loss and gradients as keeping the activations,
on this machine's device, in this precision, with or without XLA?

The whole model (VAE branch included), one batch, the loss scaled as train.py
scales it under mixed_float16 and the gradients unscaled, from the same
weights; the plain model runs twice, so that its run-to-run difference (GPU
algorithms, atomics) is the noise floor the recompute model is held to.

    python benchmarks/gpu_lent/recompute_check.py --precision=mixed_float16 [--jit_compile]

Why: on an H100 (2026-11-27, benchmarks/gpu.md) a train.py run with
--recompute learned in 24 steps where the runs without it predicted empty
maps; on the CPU this check gave bit-identical loss and gradients
(mixed_float16, with and without XLA), so the GPU is where to look.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_enum("precision", "mixed_float16", ["float32", "mixed_float16"], "Keras dtype policy.")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the forward + backward pass.")
flags.DEFINE_integer("size", 64, "Cubic input size (a multiple of 16).", lower_bound=16)
flags.DEFINE_integer("init_filters", 16, "Network width.", lower_bound=8)
flags.DEFINE_integer("levels", 4, "Recomputed levels.", lower_bound=1, upper_bound=4)
flags.DEFINE_boolean("deterministic", True, "tf.config.experimental.enable_op_determinism.")
FLAGS = flags.FLAGS
LOSS_SCALE = 32768.0  # Keras' LossScaleOptimizer's initial scale


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from brats_tf import losses
    from brats_tf.config import ModelConfig
    from brats_tf.model import build_model

    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    size = (FLAGS.size,) * 3
    cfg = ModelConfig(input_shape=size, init_filters=FLAGS.init_filters, latent_dim=64, seed=3)
    keras.utils.set_random_seed(7)
    weights = build_model(cfg).get_weights()
    rng = np.random.default_rng(8)
    image = rng.normal(size=(1, *size, 4)).astype(np.float32)
    labels = (rng.random((1, *size, 3)) > 0.7).astype(np.float32)

    def run(c):
        keras.utils.set_random_seed(7)  # the same dropout and VDraw numbers
        model = build_model(c)
        model.set_weights(weights)

        def f():
            with tf.GradientTape() as tape:
                out = model(image, training=True)
                loss = losses.reduce_per_example(losses.total_loss(labels, image, out)["loss"], 1)
                loss += tf.add_n(model.losses)
                scaled = loss * LOSS_SCALE
            grads = tape.gradient(scaled, model.trainable_variables)
            return loss, [tf.cast(g, tf.float32) / LOSS_SCALE for g in grads]

        loss, grads = tf.function(f, jit_compile=FLAGS.jit_compile, autograph=False)()
        return float(loss), [g.numpy() for g in grads], [v.path for v in model.trainable_variables]

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"device {device}, {FLAGS.precision}, XLA {FLAGS.jit_compile}, input {size}, "
          f"width {FLAGS.init_filters}, recompute levels {FLAGS.levels}")
    loss_a, grads_a, names = run(cfg)
    loss_b, grads_b, _ = run(cfg)
    loss_r, grads_r, _ = run(ModelConfig(**{**cfg.__dict__, "recompute_levels": FLAGS.levels}))
    scale = max(float(np.abs(g).max()) for g in grads_a)

    def diff(x, y):
        return max(float(np.abs(a - b).max()) for a, b in zip(x, y)) / scale

    def worst(x, y, n=5):
        # Relative to the variable's largest gradient, or to 1e-3 of the
        # model's where that is ~0 by construction (a conv bias before a
        # GroupNorm with one channel per group).
        rel = [(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-3 * scale)), name)
               for a, b, name in zip(x, y, names)]
        return ", ".join(f"{name} {r:.2g}" for r, name in sorted(rel, reverse=True)[:n])

    print(f"loss: plain {loss_a:.6f}, plain again {loss_b:.6f}, recompute {loss_r:.6f}")
    print(f"max |gradient difference| / max |gradient|: plain vs plain again {diff(grads_b, grads_a):.3g}, "
          f"recompute vs plain {diff(grads_r, grads_a):.3g}")
    print(f"largest relative differences, recompute vs plain: {worst(grads_r, grads_a)}")
    print(f"largest relative differences, plain vs plain again: {worst(grads_b, grads_a)}")


if __name__ == "__main__":
    app.run(main)
