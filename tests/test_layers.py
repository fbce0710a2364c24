"""brats_tf.layers against independent NumPy computations."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from brats_tf import layers as L


# ----------------------------------------------------------------- trilinear
def _linear_upsample_axis_np(x: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """np.interp along one axis at half-pixel-centred source coordinates."""
    n = x.shape[axis]
    src = (np.arange(n * factor) + 0.5) / factor - 0.5
    src = np.clip(src, 0, n - 1)
    return np.apply_along_axis(lambda v: np.interp(src, np.arange(n), v), axis, x)


def _trilinear_np(x: np.ndarray, size) -> np.ndarray:
    for axis, factor in zip((1, 2, 3), size):
        x = _linear_upsample_axis_np(x, axis, factor)
    return x


def _trilinear_point_np(x: np.ndarray, size, out_index) -> np.ndarray:
    """One output voxel by the explicit 8-corner trilinear formula."""
    coords, lows, highs, fracs = [], [], [], []
    for n, factor, i in zip(x.shape[1:4], size, out_index):
        c = min(max((i + 0.5) / factor - 0.5, 0.0), n - 1)
        lo = int(np.floor(c))
        hi = min(lo + 1, n - 1)
        coords.append(c)
        lows.append(lo)
        highs.append(hi)
        fracs.append(c - lo)
    value = 0.0
    for corner in itertools.product((0, 1), repeat=3):
        idx, weight = [], 1.0
        for axis, bit in enumerate(corner):
            idx.append(highs[axis] if bit else lows[axis])
            weight *= fracs[axis] if bit else 1.0 - fracs[axis]
        value = value + weight * x[0, idx[0], idx[1], idx[2], :]
    return value


@pytest.mark.parametrize(
    "shape,size",
    [
        ((1, 2, 2, 2, 1), (2, 2, 2)),
        ((2, 5, 3, 4, 3), (2, 2, 2)),
        ((1, 4, 6, 3, 2), (3, 2, 1)),
        ((1, 1, 7, 2, 1), (2, 4, 2)),
    ],
)
def test_trilinear_matches_numpy_interp(shape, size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    got = L.TrilinearUpSampling3D(size)(x).numpy()
    want = _trilinear_np(x.astype(np.float64), size)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trilinear_matches_explicit_eight_corner_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 4, 5, 2))
    got = L.TrilinearUpSampling3D(2)(x.astype(np.float32)).numpy()
    for out_index in [(0, 0, 0), (1, 2, 3), (5, 7, 9), (2, 5, 0), (4, 1, 6)]:
        want = _trilinear_point_np(x, (2, 2, 2), out_index)
        np.testing.assert_allclose(got[(0,) + out_index], want, rtol=1e-5, atol=1e-6)


def test_trilinear_hand_values_1d():
    # [0, 4] upsampled x2 with half-pixel centres: 0, 1, 3, 4 (edges clamp).
    x = np.zeros((1, 2, 1, 1, 1), np.float32)
    x[0, :, 0, 0, 0] = [0.0, 4.0]
    got = L.TrilinearUpSampling3D((2, 1, 1))(x).numpy()[0, :, 0, 0, 0]
    np.testing.assert_allclose(got, [0.0, 1.0, 3.0, 4.0])


def test_trilinear_matches_tf_image_resize_bilinear():
    """Independent TF implementation: bilinear resize of (H, W), then of (D, .)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 4, 6, 5, 3)).astype(np.float32)
    b, d, h, w, c = x.shape
    hw = tf.image.resize(x.reshape(b * d, h, w, c), (2 * h, 2 * w), method="bilinear")
    hw = tf.reshape(hw, (b, d, 2 * h * 2 * w, c))
    dd = tf.image.resize(hw, (2 * d, 2 * h * 2 * w), method="bilinear")
    want = tf.reshape(dd, (b, 2 * d, 2 * h, 2 * w, c)).numpy()
    got = L.TrilinearUpSampling3D(2)(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trilinear_unknown_spatial_size_and_float16():
    inp = keras.Input((None, None, None, 2))
    model = keras.Model(inp, L.TrilinearUpSampling3D(2)(inp))
    x = np.random.default_rng(3).normal(size=(1, 3, 5, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), _trilinear_np(x, (2, 2, 2)), atol=1e-5)
    keras.mixed_precision.set_global_policy("mixed_float16")
    y16 = L.TrilinearUpSampling3D(2)(tf.constant(x, tf.float16))
    assert y16.dtype == tf.float16
    np.testing.assert_allclose(y16.numpy(), _trilinear_np(x, (2, 2, 2)), atol=1e-2)


def test_trilinear_gradient_is_the_adjoint():
    """The layer is linear: <up(x), w> == <x, grad_x <up(x), w>>, with the
    gradient checked against finite differences as well."""
    rng = np.random.default_rng(13)
    layer = L.TrilinearUpSampling3D((2, 3, 2))
    x = tf.constant(rng.normal(size=(1, 3, 2, 4, 2)).astype(np.float32))
    w = tf.constant(rng.normal(size=(1, 6, 6, 8, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        inner = tf.reduce_sum(layer(x) * w)
    grad = tape.gradient(inner, x)
    np.testing.assert_allclose(float(tf.reduce_sum(x * grad)), float(inner), rtol=1e-5)
    theoretical, numerical = tf.test.compute_gradient(lambda v: layer(v) * w, [x], delta=1e-2)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3)


def test_trilinear_float16_gradient_compiles_with_xla():
    """Under XLA a float16 resize's gradient came out float32 and met the
    float16 ReLU gradient ("mixed precision is disallowed"): the layer resizes
    in float32. The gradient equals the float32 one (the layer is linear)."""
    rng = np.random.default_rng(21)
    layers = {
        tf.float16: L.TrilinearUpSampling3D(2, dtype="mixed_float16"),
        tf.float32: L.TrilinearUpSampling3D(2),
    }
    x = rng.normal(size=(1, 2, 3, 2, 4)).astype(np.float32)
    w = rng.normal(size=(1, 4, 6, 4, 4)).astype(np.float32)

    def grad(dtype, jit):
        @tf.function(jit_compile=jit)
        def f(v, w):
            with tf.GradientTape() as tape:
                tape.watch(v)
                y = tf.nn.relu(layers[dtype](v))
                loss = tf.reduce_sum(tf.cast(y * w, tf.float32))
            return tape.gradient(loss, v)

        return f(tf.constant(x, dtype), tf.constant(w, dtype)).numpy()

    g16 = grad(tf.float16, True)
    assert g16.dtype == np.float16
    np.testing.assert_allclose(g16.astype(np.float32), grad(tf.float32, False), atol=2e-2)


@pytest.mark.parametrize("size", [0, (2, 2), (2, -1, 2), 1.5])
def test_trilinear_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        L.TrilinearUpSampling3D(size)


# ---------------------------------------------------------------- ResNetBlock
def _group_norm_np(x, gamma, beta, groups, eps=1e-5):
    b, d, h, w, c = x.shape
    g = x.reshape(b, d, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
    var = g.var(axis=(1, 2, 3, 5), keepdims=True)
    out = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return out * gamma + beta


def _conv_same_np(x, kernel, bias):
    """3x3x3 'same' convolution, stride 1, by explicit shifted sums (NumPy)."""
    k = kernel.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    _, d, h, w, _ = x.shape
    out = np.zeros(x.shape[:4] + (kernel.shape[-1],))
    for i, j, m in itertools.product(range(k), repeat=3):
        out += xp[:, i : i + d, j : j + h, m : m + w, :] @ kernel[i, j, m]
    return out + bias


@pytest.mark.parametrize(
    "shape,groups", [((2, 4, 5, 3, 16), 8), ((1, 3, 3, 3, 8), 2), ((1, 2, 2, 2, 4), 4)]
)
def test_group_norm_matches_numpy_and_keras(shape, groups):
    rng = np.random.default_rng(8)
    x = (rng.normal(size=shape) * 3 + 5).astype(np.float32)
    gamma = rng.normal(size=shape[-1]).astype(np.float32)
    beta = rng.normal(size=shape[-1]).astype(np.float32)
    layer = L.GroupNorm(groups)
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    want = _group_norm_np(x.astype(np.float64), gamma, beta, groups)
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-4, atol=1e-4)
    # Same function (values and gradients) as Keras' GroupNormalization.
    ref = keras.layers.GroupNormalization(groups, epsilon=1e-5)
    ref.build(shape)
    ref.gamma.assign(gamma)
    ref.beta.assign(beta)
    xt = tf.constant(x)
    grads = []
    for norm in (layer, ref):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = norm(xt)
            loss = tf.reduce_sum(tf.sin(y))
        grads.append(tape.gradient(loss, [xt, norm.gamma, norm.beta]))
    for g_ours, g_keras in zip(*grads):
        np.testing.assert_allclose(g_ours.numpy(), g_keras.numpy(), rtol=1e-3, atol=1e-4)


def _group_norm_grads_np(x, gamma, dy, groups, eps=1e-5):
    """float64 gradients of sum(dy * GroupNorm(x)) by the textbook formula."""
    b, d, h, w, c = x.shape
    g = x.reshape(b, d, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
    rstd = 1 / np.sqrt(g.var(axis=(1, 2, 3, 5), keepdims=True) + eps)
    xhat = (g - mean) * rstd
    dyg = dy.reshape(g.shape)
    dxhat = dyg * gamma.reshape(groups, c // groups)
    axes = (1, 2, 3, 5)
    dx = rstd * (
        dxhat
        - dxhat.mean(axis=axes, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)
    )
    d_gamma = (dyg * xhat).sum(axis=(0, 1, 2, 3)).reshape(c)
    return dx.reshape(x.shape), d_gamma, dy.sum(axis=(0, 1, 2, 3))


def _group_norm_grads_tf_and_np(seed, shape, groups, offset):
    """(layer gradients, float64 NumPy gradients) of sum(dy * GroupNorm(x)) for x
    of std 2 around ``offset``, random gamma and dy: [x, gamma, beta] each."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
    gamma = rng.normal(size=shape[-1]).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    layer = L.GroupNorm(groups)
    layer.build(shape)
    layer.gamma.assign(gamma)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt) * dy)
    got = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    want = _group_norm_grads_np(
        x.astype(np.float64), gamma.astype(np.float64), dy.astype(np.float64), groups
    )
    return [g.numpy() for g in got], want


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_group_norm_gradient_matches_float64_formula(offset):
    """Autodiff of the layer against the textbook GN gradient in float64,
    also for inputs with a large mean (the sums are of centred values)."""
    got, want = _group_norm_grads_tf_and_np(11, (2, 6, 5, 4, 16), 4, offset)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * np.abs(w).max())


def test_group_norm_gradient_is_accurate_at_full_resolution_size():
    """2^18 voxels a channel, centred at 0 and 25 standard deviations from 0.
    The input gradient is within a few float32 roundings of float64; gamma's
    and beta's are autodiff's float32 sums over the 2^18 voxels of the
    broadcast (a few 1e-6 relative). The error does not grow with the mean:
    no sum cancels."""
    errors = {}
    for offset in (0.0, 50.0):
        got, want = _group_norm_grads_tf_and_np(21, (1, 64, 64, 64, 32), 8, offset)
        errors[offset] = [np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want)]
        for err, tol in zip(errors[offset], (1e-6, 1e-5, 1e-5)):
            assert err <= tol, (offset, errors[offset])
    for far, near in zip(errors[50.0], errors[0.0]):
        assert far <= 2 * near + 1e-7, errors


def test_group_norm_gradient_under_mixed_float16():
    """float16 in and out, float32 inside: the input gradient is float16 and
    matches the float32 layer's to float16 rounding."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(1, 4, 4, 4, 16)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    grads = []
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            layer = L.GroupNorm(8)
            xt = tf.constant(x, layer.compute_dtype)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                loss = tf.reduce_sum(tf.cast(layer(xt), tf.float32) * dy)
            grads.append(tape.gradient(loss, [xt, layer.gamma]))
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert grads[1][0].dtype == tf.float16 and grads[1][1].dtype == tf.float32
    np.testing.assert_allclose(
        grads[1][0].numpy().astype(np.float32), grads[0][0].numpy(), rtol=2e-2, atol=2e-2
    )
    np.testing.assert_allclose(grads[1][1].numpy(), grads[0][1].numpy(), rtol=1e-2, atol=1e-2)


def test_group_norm_is_accurate_for_a_large_mean():
    """Two-pass statistics: mean 100, std 0.05 normalises; one-pass float32 would not."""
    x = (np.random.default_rng(9).normal(size=(1, 8, 8, 8, 8)) * 0.05 + 100).astype(np.float32)
    got = L.GroupNorm(8)(x).numpy()
    want = _group_norm_np(x.astype(np.float64), 1.0, 0.0, 8)
    np.testing.assert_allclose(got, want, atol=1e-2)
    # The one-pass formula E[x^2] - E[x]^2 in float32 is visibly wrong here.
    g = x.reshape(1, -1, 8, 1)
    one_pass_var = (g * g).mean(axis=1, dtype=np.float32) - g.mean(axis=1, dtype=np.float32) ** 2
    true_var = x.astype(np.float64).reshape(1, -1, 8, 1).var(axis=1)
    assert np.max(np.abs(one_pass_var / true_var - 1)) > 0.05


def test_group_norm_is_accurate_at_full_resolution_size():
    """The paper crop's full resolution (160x192x128), mean 30: the float32
    means (over H and W, then D) are within ~2e-7 of float64 (relative), and
    the output within 1.5e-5; one float32 sum over all voxels would err by
    ~1e-5 of the mean here, 3e-4 in the output."""
    x = (np.random.default_rng(10).normal(size=(1, 160, 192, 128, 8)) + 30).astype(np.float32)
    got = L.GroupNorm(8)(x).numpy()
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(1, 2, 3), keepdims=True), x64.var(axis=(1, 2, 3), keepdims=True)
    assert np.max(np.abs(got - (x64 - mean) / np.sqrt(var + 1e-5))) < 1.5e-5


def test_group_norm_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels=12 is not divisible by groups=8"):
        L.GroupNorm(8)(np.zeros((1, 2, 2, 2, 12), np.float32))


def _random_block(shape, groups, seed=4, name=None):
    """A built block with random weights (GN gamma around 1, non-zero beta and biases)."""
    rng = np.random.default_rng(seed)
    block = L.ResNetBlock(shape[-1], groups=groups, name=name)
    block.build(shape)
    for var in block.weights:
        value = rng.normal(scale=0.3, size=var.shape).astype(np.float32)
        var.assign(value + 1.0 if "gamma" in var.path else value)
    return block


def test_resnet_block_matches_numpy_reference():
    """GN, ReLU, conv, GN, ReLU, conv, + input, against float64 NumPy, in
    training and in inference (the same function: no random ops)."""
    block = _random_block((2, 4, 5, 3, 8), groups=4)
    x = np.random.default_rng(5).normal(size=(2, 4, 5, 3, 8)).astype(np.float32)
    n1, c1, n2, c2 = block.norm1, block.conv1, block.norm2, block.conv2
    y = np.maximum(_group_norm_np(x.astype(np.float64), n1.gamma.numpy(), n1.beta.numpy(), 4), 0)
    y = _conv_same_np(y, c1.kernel.numpy(), c1.bias.numpy())
    y = np.maximum(_group_norm_np(y, n2.gamma.numpy(), n2.beta.numpy(), 4), 0)
    y = _conv_same_np(y, c2.kernel.numpy(), c2.bias.numpy())
    for training in (True, False, None):
        got = block(x, training=training).numpy()
        np.testing.assert_allclose(got, y + x, rtol=1e-4, atol=1e-4, err_msg=str(training))


def test_resnet_block_is_identity_when_last_conv_is_zero():
    block = L.ResNetBlock(8, groups=8)
    x = np.random.default_rng(5).normal(size=(1, 4, 4, 4, 8)).astype(np.float32)
    block(x)
    block.conv2.kernel.assign(np.zeros(block.conv2.kernel.shape, np.float32))
    np.testing.assert_allclose(block(x).numpy(), x, atol=1e-6)


def test_resnet_block_rejects_channel_mismatch_and_bad_groups():
    with pytest.raises(ValueError, match="not divisible by groups=8"):
        L.ResNetBlock(12, groups=8)
    with pytest.raises(ValueError, match="input has 4 channels"):
        L.ResNetBlock(8, groups=8)(np.zeros((1, 2, 2, 2, 4), np.float32))


def test_resnet_block_l2_regularises_both_kernels():
    block = L.ResNetBlock(8, groups=8, l2_weight=1e-5)
    block(np.zeros((1, 2, 2, 2, 8), np.float32))
    want = 1e-5 * sum(float(np.sum(c.kernel.numpy() ** 2)) for c in (block.conv1, block.conv2))
    got = float(sum(block.losses))
    assert len(block.losses) == 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_group_norm_statistics_in_float32_under_mixed_precision():
    """float16 activations whose variance overflows float16 (> 65504) still normalise."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    block = L.ResNetBlock(8, groups=8)
    assert block.norm1.compute_dtype == "float16"
    x = np.random.default_rng(6).normal(scale=600.0, size=(1, 4, 4, 4, 8)).astype(np.float32)
    block.build(x.shape)
    normed = block.norm1(tf.constant(x, tf.float16)).numpy().astype(np.float64)
    assert np.all(np.isfinite(normed))
    want = _group_norm_np(x.astype(np.float64), 1.0, 0.0, 8)
    np.testing.assert_allclose(normed, want, atol=2e-2)
    # A float16 variance of these values overflows: the float32 path matters.
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float16(x).var(dtype=np.float16))


# ------------------------------------------------------------ GaussianSampling
def test_gaussian_sampling_splits_and_reparameterises():
    latent = 4
    mean = np.array([0.0, 1.0, -2.0, 3.0], np.float32)
    log_var = np.array([0.0, np.log(4.0), np.log(0.25), -20.0], np.float32)
    params = np.tile(np.concatenate([mean, log_var]), (20000, 1))
    layer = L.GaussianSampling(seed=7)
    z, m, lv = layer(params)
    np.testing.assert_array_equal(m.numpy()[0], mean)
    np.testing.assert_array_equal(lv.numpy()[0], log_var)
    z = z.numpy()
    assert z.shape == (20000, latent) and z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), mean, atol=0.05)
    np.testing.assert_allclose(z.std(axis=0), [1.0, 2.0, 0.5, np.exp(-10.0)], rtol=0.03, atol=1e-4)


def test_gaussian_sampling_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = L.GaussianSampling()
    z, m, lv = layer(tf.zeros((2, 6), tf.float16))
    assert layer.compute_dtype == "float32"
    assert z.dtype == m.dtype == lv.dtype == tf.float32


def test_gaussian_sampling_rejects_odd_width():
    with pytest.raises(ValueError, match="must be even"):
        L.GaussianSampling()(np.zeros((1, 5), np.float32))


# -------------------------------------------------- SpatialDivisibilityCheck
def test_divisibility_check_static_and_runtime():
    with pytest.raises(ValueError, match=r"240x240x155 is not divisible by 8.*240x240x160"):
        L.SpatialDivisibilityCheck(8)(keras.Input((240, 240, 155, 4)))
    inp = keras.Input((None, None, None, 1))
    model = keras.Model(inp, L.SpatialDivisibilityCheck(8)(inp))
    ok = np.ones((1, 8, 16, 24, 1), np.float32)
    np.testing.assert_array_equal(model(ok).numpy(), ok)
    with pytest.raises(tf.errors.InvalidArgumentError, match="divisible by 8"):
        model(np.ones((1, 8, 16, 12, 1), np.float32))


# --------------------------------------------------------------- serialisation
@pytest.mark.parametrize(
    "layer",
    [
        L.ResNetBlock(16, groups=4, l2_weight=1e-5, name="blk"),
        L.GroupNorm(4, epsilon=1e-3, name="gn"),
        L.TrilinearUpSampling3D((2, 3, 1), name="up"),
        L.GaussianSampling(seed=3, name="draw"),
        L.SpatialDivisibilityCheck(16, name="check"),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == config


# ------------------------------------------------------ stride-2 convolution
def _conv_stride2_np(x, kernel, bias, pad):
    """3x3x3 stride-2 convolution by explicit sums (NumPy), each spatial axis
    padded by ``pad`` = (before, after) zeros."""
    xp = np.pad(x, ((0, 0), pad, pad, pad, (0, 0)))
    out_shape = [(n + sum(pad) - 3) // 2 + 1 for n in x.shape[1:4]]
    out = np.zeros([x.shape[0]] + out_shape + [kernel.shape[-1]])
    for i, j, k in itertools.product(range(3), repeat=3):
        window = xp[
            :,
            i : i + 2 * out_shape[0] : 2,
            j : j + 2 * out_shape[1] : 2,
            k : k + 2 * out_shape[2] : 2,
            :,
        ]
        out += window @ kernel[i, j, k]
    return out + bias


def test_stride2_convolution_pads_0_before_and_1_after_on_even_sizes():
    """The encoder's stride-2 'same' convolutions (EncoderDown, VD) on even
    sizes pad 0 voxels before and 1 after each axis (TensorFlow's 'SAME'),
    where PyTorch's padding=1 (MONAI's SegResNet) pads 1 and 1: the same
    weights give other outputs, so weights do not move between the two
    without this change."""
    rng = np.random.default_rng(41)
    x = rng.normal(size=(1, 6, 8, 4, 3)).astype(np.float32)
    conv = L.conv3d(5, 3, strides=2)
    got = conv(x).numpy()
    kernel, bias = conv.kernel.numpy().astype(np.float64), conv.bias.numpy()
    assert got.shape == (1, 3, 4, 2, 5)
    want = _conv_stride2_np(x.astype(np.float64), kernel, bias, (0, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    torch_like = _conv_stride2_np(x.astype(np.float64), kernel, bias, (1, 1))
    assert torch_like.shape == want.shape and np.abs(torch_like - want).max() > 0.1
