"""The moving average of the weights (TrainConfig.ema_decay): its recurrence
against a float64 NumPy reference, the swap, its checks, and a checkpoint
of a run with it evaluated. Under
MirroredStrategy: tests/test_training.py; in train.py (validation and the
saved model): tests/test_train_cli.py."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from brats_tf import evaluation, training
from brats_tf.config import LossConfig, ModelConfig
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


def test_a_checkpoint_of_a_run_with_an_average_is_evaluated_with_the_average(tmp_path):
    """evaluate.py on a checkpoint prefix of a run with ema_decay: the
    average, as the run's saved model; without ema_decay in config.json,
    the weights."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 16, 16, 16, 4)).astype(np.float32)
    labels = (rng.random(size=(3, 16, 16, 16, 3)) < 0.1).astype(np.float32)
    model_config = ModelConfig(
        input_shape=(16, 16, 16), init_filters=8, latent_dim=8, blocks_down=(1, 1), blocks_up=(1,)
    )
    config = training.TrainConfig(
        model_dir=str(tmp_path),
        num_train_cases=3,
        epochs=1,
        initial_lr=1e-2,
        ema_decay=0.5,
        verbose=False,
    )

    def dataset_fn(ctx, epoch):
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(1)

    trainer = training.Trainer(model_config, LossConfig(), config, dataset_fn)
    trainer.train()
    prefix = trainer.manager.latest_checkpoint
    averages = dict(
        zip(
            (v.path for v in trainer.model.trainable_variables),
            (a.numpy() for a in trainer.weight_average.averages),
        )
    )
    weights = {v.path: v.numpy() for v in trainer.model.trainable_variables}
    resolved = {"model": dataclasses.asdict(model_config), "train": {"ema_decay": 0.5}}
    (tmp_path / "config.json").write_text(json.dumps(resolved))
    loaded = evaluation.load_model(prefix).model.trainable_variables
    assert len(loaded) > 10
    moved = 0
    for variable in loaded:
        np.testing.assert_array_equal(variable.numpy(), averages[variable.path])
        moved += not np.array_equal(averages[variable.path], weights[variable.path])
    assert moved > len(loaded) // 2
    resolved["train"]["ema_decay"] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(resolved))
    for variable in evaluation.load_model(prefix).model.trainable_variables:
        np.testing.assert_array_equal(variable.numpy(), weights[variable.path])
