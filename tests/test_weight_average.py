"""The moving average of the weights (TrainConfig.ema_decay): its recurrence
against a float64 NumPy reference, the swap, and its checks. Under
MirroredStrategy, across a resume and restored by evaluate.py:
tests/test_training.py; in train.py (validation and the saved model):
tests/test_train_cli.py."""

import numpy as np
import pytest
import tensorflow as tf

from brats_tf import training
from brats_tf.training.weight_average import WeightAverage


def test_average_is_the_running_mean_then_the_moving_average():
    """decay 0.8: steps 1-5 the plain mean of the weights after each step
    (the initial weights left out), then a <- 0.8 a + 0.2 w."""
    rng = np.random.default_rng(0)
    shapes = [(3,), (2, 2)]
    weights = [tf.Variable(rng.normal(size=s).astype(np.float32)) for s in shapes]
    average = WeightAverage(weights, decay=0.8)
    update = tf.function(average.update)
    seen = [[] for _ in shapes]
    reference = [None for _ in shapes]
    for step in range(1, 21):
        for k, (w, s) in enumerate(zip(weights, shapes)):
            value = rng.normal(size=s).astype(np.float32)
            w.assign(value)
            seen[k].append(value.astype(np.float64))
            if step <= 5:
                reference[k] = np.mean(seen[k], axis=0)
            else:
                reference[k] = 0.8 * reference[k] + 0.2 * seen[k][-1]
        update()
        for k in range(len(shapes)):
            np.testing.assert_allclose(average.averages[k].numpy(), reference[k], rtol=1e-5)
    assert int(average.updates.numpy()) == 20


def test_swapped_in_puts_the_averages_in_place_and_restores_the_weights():
    weight = tf.Variable([1.0, 2.0])
    average = WeightAverage([weight], decay=0.5)
    weight.assign([3.0, 4.0])
    average.update()  # step 1: the average is the weights after it
    weight.assign([5.0, 8.0])
    average.update()  # step 2: (3 + 5) / 2, (4 + 8) / 2
    weight.assign([7.0, 9.0])
    with average.swapped_in():
        np.testing.assert_array_equal(weight.numpy(), [4.0, 6.0])
    np.testing.assert_array_equal(weight.numpy(), [7.0, 9.0])
    with pytest.raises(RuntimeError, match="inside"):
        with average.swapped_in():
            raise RuntimeError("inside")
    np.testing.assert_array_equal(weight.numpy(), [7.0, 9.0])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay, tmp_path):
    with pytest.raises(ValueError, match="decay in \\(0, 1\\)"):
        WeightAverage([tf.Variable(1.0)], decay=decay)
    if decay != 0.0:  # 0 is TrainConfig's "no average"
        with pytest.raises(ValueError, match="ema_decay must be in \\[0, 1\\)"):
            training.TrainConfig(model_dir=str(tmp_path), num_train_cases=2, ema_decay=decay)
