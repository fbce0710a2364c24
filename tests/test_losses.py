"""brats_tf.losses against NumPy references and hand-computed values."""

import numpy as np
import pytest
import tensorflow as tf

from brats_tf import losses
from brats_tf.config import LossConfig


def _dice_np(t, p, eps=1e-5):
    t, p = t.astype(np.float64), p.astype(np.float64)
    out = np.zeros(t.shape[0])
    for b in range(t.shape[0]):
        for c in range(t.shape[-1]):
            tc, pc = t[b, ..., c], p[b, ..., c]
            out[b] += 1 - 2 * np.sum(tc * pc) / (np.sum(tc**2) + np.sum(pc**2) + eps)
    return out


def test_dice_hand_computed_2x2x2():
    # One channel; 2 of 8 voxels true; prediction 1.0 on one of them, 0.5 on a false one.
    t = np.zeros((1, 2, 2, 2, 1), np.float32)
    t[0, 0, 0, 0, 0] = t[0, 1, 1, 1, 0] = 1
    p = np.zeros_like(t)
    p[0, 0, 0, 0, 0] = 1.0
    p[0, 0, 1, 0, 0] = 0.5
    # 1 - 2*1 / (2 + 1.25 + eps)
    want = 1 - 2.0 / (3.25 + 1e-5)
    np.testing.assert_allclose(losses.soft_dice_loss(t, p).numpy(), [want], rtol=1e-6)


def test_dice_matches_numpy_on_random_batch():
    rng = np.random.default_rng(0)
    t = (rng.random((3, 4, 5, 6, 3)) > 0.7).astype(np.float32)
    p = rng.random((3, 4, 5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.soft_dice_loss(t, p).numpy(), _dice_np(t, p), rtol=1e-5)


@pytest.mark.parametrize(
    "truth,pred,want",
    [
        ("empty", "zeros", 3.0),  # 1 - 0 / eps per channel: finite, no NaN
        ("empty", "ones", 3.0),  # all false positives
        ("full", "zeros", 3.0),  # all missed
        ("full", "ones", 3 * (1 - 2 * 8 / (16 + 1e-5))),  # perfect
    ],
)
def test_dice_edge_cases_are_finite(truth, pred, want):
    t = (
        np.zeros((1, 2, 2, 2, 3), np.float32)
        if truth == "empty"
        else np.ones((1, 2, 2, 2, 3), np.float32)
    )
    p = np.zeros_like(t) if pred == "zeros" else np.ones_like(t)
    got = losses.soft_dice_loss(t, p).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, [want], rtol=1e-6, atol=1e-6)


def test_dice_perfect_prediction_is_near_zero_and_gradients_finite_on_empty():
    t = np.zeros((1, 4, 4, 4, 3), np.float32)
    t[0, 1:3, 1:3, 1:3, :] = 1
    assert losses.soft_dice_loss(t, t).numpy()[0] < 1e-5
    p = tf.Variable(np.zeros_like(t))
    with tf.GradientTape() as tape:
        loss = losses.soft_dice_loss(np.zeros_like(t), p)
    grad = tape.gradient(loss, p)
    assert np.all(np.isfinite(grad.numpy()))


def test_l2_is_mean_squared_error():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5, 4)).astype(np.float32)
    y = rng.normal(size=x.shape).astype(np.float32)
    want = ((x.astype(np.float64) - y) ** 2).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(losses.l2_loss(x, y).numpy(), want, rtol=1e-5)
    # Hand value: every voxel off by 2 -> 4.
    np.testing.assert_allclose(
        losses.l2_loss(np.zeros((1, 2, 2, 2, 4)), np.full((1, 2, 2, 2, 4), 2.0)), [4.0]
    )


def test_kl_matches_paper_formula():
    mean = np.array([[0.0, 1.0, -2.0], [0.0, 0.0, 0.0]], np.float32)
    std = np.array([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]], np.float32)
    n = 1000
    # (1/N) sum(mean^2 + std^2 - log std^2 - 1), by hand for row 0:
    row0 = (0 + 1 - 0 - 1) + (1 + 4 - np.log(4) - 1) + (4 + 0.25 - np.log(0.25) - 1)
    got = losses.kl_loss(mean, np.log(std**2), n).numpy()
    np.testing.assert_allclose(got, [row0 / n, 0.0], rtol=1e-6, atol=1e-9)


def test_total_loss_weights_and_voxel_count():
    rng = np.random.default_rng(2)
    b, shape = 2, (4, 4, 2)
    labels = (rng.random((b,) + shape + (3,)) > 0.5).astype(np.float32)
    image = rng.normal(size=(b,) + shape + (4,)).astype(np.float32)
    outputs = {
        "seg": rng.random((b,) + shape + (3,)).astype(np.float32),
        "recon": rng.normal(size=(b,) + shape + (4,)).astype(np.float32),
        "z_mean": rng.normal(size=(b, 5)).astype(np.float32),
        "z_log_var": rng.normal(size=(b, 5)).astype(np.float32),
    }
    got = losses.total_loss(labels, image, outputs)
    dice = _dice_np(labels, outputs["seg"])
    l2 = ((image.astype(np.float64) - outputs["recon"]) ** 2).reshape(b, -1).mean(axis=1)
    zm, zlv = outputs["z_mean"].astype(np.float64), outputs["z_log_var"].astype(np.float64)
    kl = (zm**2 + np.exp(zlv) - zlv - 1).sum(axis=1) / 32  # N = 4 * 4 * 2 voxels
    np.testing.assert_allclose(got["dice"].numpy(), dice, rtol=1e-5)
    np.testing.assert_allclose(got["l2"].numpy(), l2, rtol=1e-5)
    np.testing.assert_allclose(got["kl"].numpy(), kl, rtol=1e-5)
    np.testing.assert_allclose(got["loss"].numpy(), dice + 0.1 * l2 + 0.1 * kl, rtol=1e-5)
    custom = losses.total_loss(labels, image, outputs, LossConfig(1.0, 0.5, 0.0))
    np.testing.assert_allclose(custom["loss"].numpy(), dice + 0.5 * l2, rtol=1e-5)


def test_total_loss_without_vae_is_dice_only():
    t = np.ones((1, 2, 2, 2, 3), np.float32)
    p = np.full_like(t, 0.5)
    got = losses.total_loss(t, np.zeros((1, 2, 2, 2, 4)), {"seg": p})
    np.testing.assert_allclose(got["loss"].numpy(), _dice_np(t, p), rtol=1e-6)
    np.testing.assert_array_equal(got["kl"].numpy(), [0.0])


def test_losses_compute_in_float32_from_float16_inputs():
    t = tf.ones((1, 2, 2, 2, 3), tf.float16)
    p = tf.fill((1, 2, 2, 2, 3), tf.constant(0.5, tf.float16))
    for value in (
        losses.soft_dice_loss(t, p),
        losses.l2_loss(t, p),
        losses.kl_loss(tf.zeros((1, 4), tf.float16), tf.zeros((1, 4), tf.float16), 8),
    ):
        assert value.dtype == tf.float32


def test_reduce_per_example_divides_by_global_batch():
    np.testing.assert_allclose(losses.reduce_per_example([1.0, 3.0], 8).numpy(), 0.5)


@pytest.mark.parametrize(
    "field,value", [("l2_weight", -0.1), ("dice_epsilon", 0.0), ("kl_weight", "x")]
)
def test_loss_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})
