"""A moving average of the weights (Polyak averaging), for the model that is
validated and saved; not in the paper, off by default (docs/training.md).

After optimizer step n (n = 1, 2, ...) every average a of a weight w becomes

    a <- d_n a + (1 - d_n) w,    d_n = min(decay, (n - 1) / n),

so for the first 1 / (1 - decay) steps a is the plain mean of the weights
after each step so far (the initial weights count for nothing), then an
exponential moving average with ``decay``, whose memory is about
1 / (1 - decay) steps.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

# The weights' average in a training checkpoint: tf.train.Checkpoint(...,
# weight_average=WeightAverage.checkpointed).
CHECKPOINT_KEY = "weight_average"


class WeightAverage:
    """Averages of ``variables``, updated by ``update`` after each optimizer
    step; ``swapped_in`` puts them in the variables' place for a while.

    Made under the strategy's scope (the averages are mirrored like the
    weights); ``update`` runs in the cross-replica context, after the
    replicas' update, so every replica holds the same averages.
    ``checkpointed`` is what a checkpoint saves and restores: the averages
    and the number of updates.
    """

    def __init__(self, variables, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the weights' average needs a decay in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self._weights = list(variables)
        self.averages = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False, name=f"average_{i}")
            for i, v in enumerate(self._weights)
        ]
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")
        self.checkpointed = {"averages": self.averages, "updates": self.updates}

    def update(self) -> None:
        """One step's update of every average (see the module's docstring)."""
        n = tf.cast(self.updates + 1, tf.float32)
        decay = tf.minimum(self.decay, (n - 1.0) / n)
        for average, weight in zip(self.averages, self._weights):
            average.assign_sub((1.0 - decay) * (average - tf.cast(weight, average.dtype)))
        self.updates.assign_add(1)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averages in the weights' place inside the block; the weights as
        they were after it, also when the block raises."""
        weights = [tf.identity(tf.convert_to_tensor(w)) for w in self._weights]
        for weight, average in zip(self._weights, self.averages):
            weight.assign(average)
        try:
            yield
        finally:
            for weight, value in zip(self._weights, weights):
                weight.assign(value)


def restore_averages(variables, prefix: str) -> None:
    """Assigns to ``variables`` (the trainable variables of a model built as
    the run's) the weights' average that the training checkpoint ``prefix``
    holds; an error when it holds none for them."""
    averages = [tf.Variable(tf.zeros_like(tf.convert_to_tensor(v))) for v in variables]
    checkpoint = tf.train.Checkpoint(**{CHECKPOINT_KEY: {"averages": averages}})
    checkpoint.restore(prefix).expect_partial().assert_existing_objects_matched()
    for variable, average in zip(variables, averages):
        variable.assign(average)
