"""One training step (§3.4, §3.5) and its optimizer.

* distribution scaling: per-example losses are summed over the replica's
  examples and divided by the GLOBAL batch size, the regularisation loss by
  the number of replicas, because the replicas' gradients are SUMMED;
* mixed precision: ``optimizer.scale_loss`` before the gradient (a
  ``LossScaleOptimizer`` unscales, and skips steps whose gradients overflow).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from brats_tf import losses
from brats_tf.config import LossConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (and on_nonfinite='stop')."""


def make_optimizer(
    learning_rate: float,
    precision: str,
    skip_nonfinite: bool = False,
    optimizer_fn: Callable[[float], keras.optimizers.Optimizer] | None = None,
    epsilon: float = 1e-7,
) -> keras.optimizers.Optimizer:
    """train.py's optimizer: Adam (§3.5), or ``optimizer_fn(learning_rate)``,
    wrapped in a LossScaleOptimizer under mixed_float16 (dynamic loss
    scaling) or with ``skip_nonfinite``: in float32 the scale stays a power
    of two (exact) and the wrapper's only effect is to skip updates whose
    gradients are not finite."""
    optimizer = (
        optimizer_fn or (lambda lr: keras.optimizers.Adam(learning_rate=lr, epsilon=epsilon))
    )(learning_rate)
    if precision == "mixed_float16" or skip_nonfinite:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_config: LossConfig,
    strategy: tf.distribute.Strategy | None = None,
    region_dice=(),
    jit_compile: bool = False,
):
    """The training step (§3.4, §3.5), for train.py and the benchmarks alike:
    ``step(batch)`` with ``batch = {"image", "label"}`` (per-replica batches
    of a distributed dataset under ``strategy``) runs forward, the total loss,
    backward and one optimizer update on every replica, updates the
    ``region_dice`` metrics, and returns the per-term loss sums and the
    example count, summed over replicas.

    Per-example losses are summed over the replica's examples and divided by
    the GLOBAL batch, the weight decay (``model.losses``) by the number of
    replicas, because the replicas' gradients are summed; under
    mixed_float16 the loss is scaled before the gradient
    (``optimizer.scale_loss``; a LossScaleOptimizer unscales and skips steps
    whose gradients overflow).
    """
    strategy = strategy or tf.distribute.get_strategy()

    def replica_step(batch):
        image, labels = batch["image"], batch["label"]
        ctx = tf.distribute.get_replica_context()
        local = tf.cast(tf.shape(image)[0], tf.float32)
        global_batch = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)
        with tf.GradientTape() as tape:
            outputs = model(image, training=True)
            terms = losses.total_loss(labels, image, outputs, loss_config)
            loss = losses.reduce_per_example(terms["loss"], global_batch)
            if model.losses:
                loss += tf.add_n(model.losses) / ctx.num_replicas_in_sync
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        for metric in region_dice:
            metric.update_state(labels, outputs["seg"])
        stats = {name: tf.reduce_sum(value) for name, value in terms.items()}
        stats["count"] = local
        return stats

    def step(batch):
        per_replica = strategy.run(replica_step, args=(batch,))
        return tf.nest.map_structure(
            lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), per_replica
        )

    return tf.function(step, jit_compile=jit_compile)
