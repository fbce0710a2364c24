"""brats_tf.layers against independent NumPy computations."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from brats_tf import layers as L
from reduced_precision import slack

FUSED_ENV = "BRATS_TF_FUSED_ELEMENTWISE"


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


def test_trilinear_gradient_does_not_keep_the_resized_images():
    """The resize's gradient needs the original image's shape only: the
    layer's gradient graph feeds ResizeBilinearGrad zeros made in the backward
    pass, so the forward tensors (the half-upsampled intermediate, the input)
    are not kept alive for it."""
    layer = L.TrilinearUpSampling3D(2)
    w = tf.constant(np.random.default_rng(22).normal(size=(1, 4, 6, 4, 2)).astype(np.float32))

    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) * w)
        return tape.gradient(loss, x)

    graph = grad.get_concrete_function(tf.TensorSpec((1, 2, 3, 2, 2), tf.float32)).graph
    grads = [op for op in graph.get_operations() if op.type == "ResizeBilinearGrad"]
    assert len(grads) == 2  # H, W then D
    for op in grads:
        assert op.inputs[1].op.type in ("Fill", "Const", "ZerosLike", "BroadcastTo"), \
            op.inputs[1].op.type


def test_trilinear_float16_gradient_compiles_with_xla():
    """Under XLA a float16 resize's gradient came out float32 and met the
    float16 ReLU gradient ("mixed precision is disallowed"): the layer resizes
    in float32. The gradient equals the float32 one (the layer is linear)."""
    rng = np.random.default_rng(21)
    layers = {tf.float16: L.TrilinearUpSampling3D(2, dtype="mixed_float16"),
              tf.float32: L.TrilinearUpSampling3D(2)}
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
    for i, j, l in itertools.product(range(k), repeat=3):
        out += xp[:, i : i + d, j : j + h, l : l + w, :] @ kernel[i, j, l]
    return out + bias


@pytest.mark.parametrize("shape,groups", [((2, 4, 5, 3, 16), 8), ((1, 3, 3, 3, 8), 2), ((1, 2, 2, 2, 4), 4)])
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
    dx = rstd * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
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
    want = _group_norm_grads_np(x.astype(np.float64), gamma.astype(np.float64),
                                dy.astype(np.float64), groups)
    return [g.numpy() for g in got], want


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_group_norm_gradient_matches_float64_formula(offset):
    """The hand-written backward pass (custom gradient) against float64 NumPy,
    also for inputs with a large mean (no cancellation in the sums)."""
    got, want = _group_norm_grads_tf_and_np(11, (2, 6, 5, 4, 16), 4, offset)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * np.abs(w).max())


def test_group_norm_gradient_is_accurate_at_full_resolution_size():
    """The per-channel sums of the backward pass over 2^18 voxels a channel
    (a GEMM for sum(dy * x), then minus mean * sum(dy)), with a mean 25 standard
    deviations from 0: relative error of a few 1e-5 at most against float64."""
    got, want = _group_norm_grads_tf_and_np(21, (1, 64, 64, 64, 32), 8, 50.0)
    for g, w, tol in zip(got, want, (1e-6, 1e-4, 1e-6)):
        assert np.abs(g - w).max() <= tol * np.abs(w).max()


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
    np.testing.assert_allclose(grads[1][0].numpy().astype(np.float32), grads[0][0].numpy(),
                               rtol=2e-2, atol=2e-2)
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


@pytest.mark.parametrize("shape,offset", [((1, 96, 96, 64, 8), 30.0), ((1, 64, 48, 40, 32), 0.0),
                                          ((2, 16, 24, 8, 16), 50.0), ((1, 5, 7, 3, 8), 1.0)])
def test_spatial_sum_matches_float64(shape, offset):
    """GroupNorm's per-channel sums over D, H, W (matrix-vector products over
    H, then D and W) against float64 sums, for zero-mean data (sums that
    cancel) and data far from 0; also with the spatial shape unknown when
    traced, as in the SavedModel. (One float32 reduce_sum over all voxels
    misses the first case's bound 15x: 4e-6.)"""
    x = (np.random.default_rng(13).normal(size=shape) + offset).astype(np.float32)
    want = x.astype(np.float64).sum(axis=(1, 2, 3))
    scale = np.abs(x.astype(np.float64)).sum(axis=(1, 2, 3))  # what rounding is relative to
    dynamic = tf.function(L._spatial_sum, input_signature=[
        tf.TensorSpec([None, None, None, None, shape[-1]], tf.float32)])
    for got in (L._spatial_sum(tf.constant(x)).numpy(), dynamic(x).numpy()):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want) / scale) < 3e-7


def test_group_norm_is_accurate_at_full_volume_size():
    """12.6 M voxels of mean 30: the float32 sums stay accurate (short sums, _spatial_sum)."""
    x = (np.random.default_rng(10).normal(size=(1, 128, 128, 96, 8)) + 30).astype(np.float32)
    got = L.GroupNorm(8)(x).numpy()
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(1, 2, 3), keepdims=True), x64.var(axis=(1, 2, 3), keepdims=True)
    assert np.max(np.abs(got - (x64 - mean) / np.sqrt(var + 1e-5))) < 5e-5


def test_group_norm_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels=12 is not divisible by groups=8"):
        L.GroupNorm(8)(np.zeros((1, 2, 2, 2, 12), np.float32))


@pytest.mark.parametrize("fused", ["off", "on"])
def test_resnet_block_matches_numpy_reference(fused, monkeypatch):
    monkeypatch.setenv(FUSED_ENV, fused)  # training: GN tails as TensorFlow ops, or XLA loops
    rng = np.random.default_rng(4)
    block = L.ResNetBlock(8, groups=4)
    x = rng.normal(size=(2, 4, 5, 3, 8)).astype(np.float32)
    block(x)  # build
    for var in block.weights:  # non-trivial GN affine parameters too
        var.assign(rng.normal(scale=0.3, size=var.shape).astype(np.float32))
    n1, c1, n2, c2 = block.norm1, block.conv1, block.norm2, block.conv2
    y = np.maximum(_group_norm_np(x, n1.gamma.numpy(), n1.beta.numpy(), 4), 0)
    y = _conv_same_np(y, c1.kernel.numpy(), c1.bias.numpy())
    y = np.maximum(_group_norm_np(y, n2.gamma.numpy(), n2.beta.numpy(), 4), 0)
    y = _conv_same_np(y, c2.kernel.numpy(), c2.bias.numpy())
    # The training path (GroupNorm layers) and the inference path (GN + ReLU
    # in one expression, ResNetBlock._inference_residual) alike.
    for training in (True, False, None):
        got = block(x, training=training).numpy()
        np.testing.assert_allclose(got, y + x, rtol=1e-4, atol=1e-4, err_msg=str(training))


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_resnet_block_inference_path_equals_the_training_path(precision, monkeypatch):
    """The inference path's ReLU runs in float32 before the cast to the
    compute dtype, the training path's after it: the same values, bit for bit
    with TensorFlow's elementwise ops in both. With XLA's fused GroupNorm
    tails in training (``layers._fused``), to float32 rounding: XLA may
    contract x * a + b into one FMA."""
    keras.mixed_precision.set_global_policy(precision)
    try:
        block = L.ResNetBlock(16, groups=8)
        rng = np.random.default_rng(6)
        x = tf.cast(rng.normal(size=(1, 6, 8, 4, 16)).astype(np.float32), block.compute_dtype)
        block(x)
        for var in block.weights:
            var.assign(rng.normal(scale=0.3, size=var.shape).astype(np.float32))
        monkeypatch.setenv(FUSED_ENV, "off")
        train, infer = block(x, training=True), block(x, training=False)
        monkeypatch.setenv(FUSED_ENV, "on")
        fused = block(x, training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert infer.dtype == train.dtype == fused.dtype == x.dtype
    infer = infer.numpy().astype(np.float32)
    np.testing.assert_array_equal(infer, train.numpy().astype(np.float32))
    if precision == "float32":  # (in 16 bits a last-bit difference may round either way)
        np.testing.assert_allclose(fused.numpy(), infer, rtol=1e-5,
                                   atol=1e-6 * np.abs(infer).max())


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


# ------------------------------------------------- recomputed ResNet block
def _block_pair(shape, groups, dtype_policy=None, seed=11):
    """Two blocks with the same random weights: autodiff and recompute."""
    rng = np.random.default_rng(seed)
    plain = L.ResNetBlock(shape[-1], groups=groups, name="plain")
    fused = L.ResNetBlock(shape[-1], groups=groups, recompute=True, name="fused")
    plain.build(shape)
    fused.build(shape)
    for a, b in zip(plain.weights, fused.weights):  # non-trivial GN affine and biases
        value = rng.normal(scale=0.3, size=a.shape).astype(np.float32)
        if "gamma" in a.path:
            value += 1.0
        a.assign(value)
        b.assign(value)
    return plain, fused


def _block_grads(block, x, weight):
    """A block's output in training and the gradients of sum(output * weight)
    with respect to its input and its weights (that order)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = block(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weight)
    return y, tape.gradient(loss, [x] + block.trainable_variables)


def _block_value_and_grads(block, x, weight, graph):
    def run(x):
        return _block_grads(block, x, weight)

    if graph:
        spec = tf.TensorSpec([None, None, None, None, x.shape[-1]], x.dtype)
        run = tf.function(run, input_signature=[spec])  # unknown sizes
    y, grads = run(x)
    return y.numpy().astype(np.float64), [g.numpy().astype(np.float64) for g in grads]


@pytest.mark.parametrize("graph", [False, True])
def test_recomputed_block_has_the_values_and_gradients_of_autodiff(graph, monkeypatch):
    """The hand-written backward pass of the recompute path (ResNetBlock(recompute=True)
    in training) against TensorFlow's autodiff of the plain block: output, input
    gradient and all eight weight gradients, batch of 2 (per-example GN statistics)."""
    shape = (2, 6, 5, 4, 8)
    plain, fused = _block_pair(shape, groups=4)
    rng = np.random.default_rng(12)
    x = tf.constant(rng.normal(size=shape).astype(np.float32))
    weight = tf.constant(rng.normal(size=shape).astype(np.float32))
    monkeypatch.setenv(FUSED_ENV, "off")  # the plain block as Keras layers: autodiff
    want_y, want = _block_value_and_grads(plain, x, weight, graph)
    monkeypatch.delenv(FUSED_ENV)
    got_y, got = _block_value_and_grads(fused, x, weight, graph)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    names = ["input"] + [v.path for v in plain.trainable_variables]
    assert len(got) == len(want) == 9
    for g, w, name in zip(got, want, names):
        scale = np.abs(w).max()
        assert scale > 1e-3, name  # every gradient is non-trivial here
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    # In inference the recompute block is the plain function.
    np.testing.assert_allclose(fused(x, training=False).numpy(), want_y, rtol=1e-5, atol=1e-5)


def test_fused_elementwise_mode_from_the_environment(monkeypatch):
    """BRATS_TF_FUSED_ELEMENTWISE: auto (default) = on where TensorFlow sees no
    GPU; on; off; anything else is refused, naming the variable."""
    no_gpu = not tf.config.list_logical_devices("GPU")
    monkeypatch.delenv(FUSED_ENV, raising=False)
    assert L.fused_elementwise() is no_gpu
    for value, want in (("auto", no_gpu), ("", no_gpu), ("on", True), (" OFF ", False)):
        monkeypatch.setenv(FUSED_ENV, value)
        assert L.fused_elementwise() is want, value
    # In the recomputed blocks of --recompute only when asked for (memory).
    for value, want in (("auto", False), ("on", True), ("off", False)):
        monkeypatch.setenv(FUSED_ENV, value)
        assert L.fused_elementwise(recompute=True) is want, value
    monkeypatch.setenv(FUSED_ENV, "xla")
    with pytest.raises(ValueError, match="BRATS_TF_FUSED_ELEMENTWISE='xla'"):
        L.fused_elementwise()


def _xla_calls(graph) -> int:
    """Ops of a traced graph that XLA must compile (calls of jit_compile functions)."""
    return sum(1 for op in graph.get_operations()
               if "_XlaMustCompile" in op.node_def.attr and op.get_attr("_XlaMustCompile"))


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_elementwise_gives_the_values_and_gradients_of_tensorflows_ops(recompute,
                                                                             monkeypatch):
    """GroupNorm's elementwise tails compiled by XLA in training (``layers._fused``,
    BRATS_TF_FUSED_ELEMENTWISE=on) against TensorFlow's ops (off), through a
    plain and a recomputed ResNet block: output, input gradient and all eight
    weight gradients to float32 rounding. The traced step calls XLA only when
    on (the two GroupNorms' forward and backward tails: 4 calls in the plain
    block; the recomputed block's 5 GN + ReLU and 2 backward tails: 7), by
    default (auto, on a CPU) only in the plain block, the inference path never."""
    shape = (2, 6, 5, 4, 8)
    plain, recomputed = _block_pair(shape, groups=4)
    block = recomputed if recompute else plain
    rng = np.random.default_rng(14)
    x = tf.constant(rng.normal(size=shape).astype(np.float32))
    weight = tf.constant(rng.normal(size=shape).astype(np.float32))

    def step(x):
        return _block_grads(block, x, weight)

    results, calls = {}, {}
    for mode in ("off", "on", "auto"):
        monkeypatch.setenv(FUSED_ENV, mode)
        if mode != "auto":
            results[mode] = _block_value_and_grads(block, x, weight, graph=True)
        calls[mode] = _xla_calls(tf.function(step).get_concrete_function(x).graph)
    on_cpu = not tf.config.list_logical_devices("GPU")
    assert calls == {"off": 0, "on": 7 if recompute else 4,
                     "auto": 4 if on_cpu and not recompute else 0}
    inference = tf.function(lambda x: block(x, training=False)).get_concrete_function(x)
    assert _xla_calls(inference.graph) == 0
    (want_y, want), (got_y, got) = results["off"], results["on"]
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6 * np.abs(want_y).max())
    for g, w, v in zip(got, want, ["input"] + [v.path for v in block.trainable_variables]):
        scale = np.abs(w).max()
        assert scale > 1e-3, v
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=v)


def test_recomputed_block_under_mixed_float16(monkeypatch):
    """float16 activations and gradients, float32 GN statistics: the recompute
    path and the plain block with XLA-fused GN tails agree with autodiff of
    the same float16 block with TensorFlow's ops, and all with float32."""
    shape = (1, 8, 8, 8, 16)
    rng = np.random.default_rng(13)
    x32 = rng.normal(size=shape).astype(np.float32)
    weight = tf.constant(rng.normal(size=shape).astype(np.float32))
    monkeypatch.setenv(FUSED_ENV, "off")  # float32 autodiff of the Keras layers
    ref32 = _block_value_and_grads(_block_pair(shape, 8)[0], tf.constant(x32), weight, True)
    keras.mixed_precision.set_global_policy("mixed_float16")
    plain, fused = _block_pair(shape, groups=8)
    x16 = tf.constant(x32, tf.float16)
    results = []
    for block, mode in ((plain, "off"), (plain, "on"), (fused, "auto")):
        monkeypatch.setenv(FUSED_ENV, mode)
        results.append(_block_value_and_grads(block, x16, weight, True))
    tol = slack("float16")  # looser where float16 convolutions accumulate in float16
    for (y, grads) in results:
        np.testing.assert_allclose(y, ref32[0], rtol=2e-2 * tol, atol=2e-2 * tol)
        for g, w in zip(grads, ref32[1]):
            scale = np.abs(w).max()
            np.testing.assert_allclose(g, w, rtol=3e-2 * tol, atol=3e-2 * tol * scale)


_CHAIN_MEMORY = r"""
import sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)  # as train.py --recompute
from brats_tf.layers import ResNetBlock

mode, n = sys.argv[1], int(sys.argv[2])
if mode in ("unfused", "recompute_grad"):  # GN tails as TensorFlow's ops
    import os
    os.environ["BRATS_TF_FUSED_ELEMENTWISE"] = "off"
shape = (1, 32, 32, 32, 16)
blocks = [ResNetBlock(16, groups=4, recompute=mode == "recompute", name=f"b{i}")
          for i in range(n)]
for b in blocks:
    b.build(shape)
    if mode == "recompute_grad":  # TensorFlow's generic gradient checkpointing
        b._residual = tf.recompute_grad(b._residual)
x = tf.constant(np.random.default_rng(0).normal(size=shape).astype(np.float32))
variables = [v for b in blocks for v in b.trainable_variables]

@tf.function
def step(x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x
        for b in blocks:
            y = b(y, training=True)
        loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, [x] + variables)

step(x)
tf.config.experimental.reset_memory_stats("CPU:0")
base = tf.config.experimental.get_memory_info("CPU:0")["current"]
step(x)
peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
print((peak - base) / (np.prod(shape) * 4))
"""


def test_recompute_keeps_one_activation_per_block():
    """Peak memory of forward + backward through a chain of 6 blocks, in units
    of one activation (TensorFlow's allocator statistics, one op at a time):
    without recompute each block keeps ~4 activations for its backward pass;
    with it, only its input, plus a working set of ~4 while one block's
    gradient is computed (input, incoming gradient, two temporaries) -- about
    three fewer than tf.recompute_grad of the same block (8.25 against 11
    here). Measured with TensorFlow's kernel gradient; brats_tf.conv_grad's
    (the default on CPUs) adds to the working set its shifted copies of one
    slab (here the whole 2 MiB volume: MIN_SLAB_BYTES) and the slab's padded
    x and dy, and TensorFlow's matrix product reorders one operand. The plain
    block with XLA-fused GN tails (the default on CPUs) keeps no more than
    with TensorFlow's ops."""
    plain, unfused, generic, fused = (
        _peak_in_activations(_CHAIN_MEMORY, mode, "6", kernel_grad="native")
        for mode in ("plain", "unfused", "recompute_grad", "recompute"))
    assert plain >= 3 * 6, plain
    assert plain <= unfused + 0.5, (plain, unfused)
    assert fused <= 6 + 4, fused
    assert fused <= generic - 2, (fused, generic)
    fused_matmul = _peak_in_activations(_CHAIN_MEMORY, "recompute", "6", kernel_grad="matmul")
    from brats_tf import conv_grad

    shape = (1, 32, 32, 32, 16)
    planes = min(conv_grad._slab_planes(shape, 16), 32)
    copies = planes * 34 * 34 * (9 + 3) / 32**3  # in activations (16 channels each)
    assert fused_matmul <= fused + 1.75 * copies + 2.5, (fused_matmul, fused, copies)


def _peak_in_activations(script, *args, kernel_grad="auto"):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, BRATS_TF_KERNEL_GRADIENT=kernel_grad)
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


@pytest.mark.parametrize("head_class", ["conv", "head"])
def test_head_conv_waits_for_the_previous_block(head_class):
    """HeadConv3D's input gradient depends on the backward pass of the recomputed
    block whose gradient was built before it (so two branches' full-size
    gradients are not alive at once); its kernel gradient does not wait. With
    Keras' Conv3D head nothing orders them. Checked in the traced graph."""
    shape = (1, 8, 8, 8, 8)
    block = L.ResNetBlock(8, groups=2, recompute=True, name="b")
    head = {"conv": lambda: keras.layers.Conv3D(2, 1, padding="same", name="h"),
            "head": lambda: L.HeadConv3D(2, padding="same", name="h")}[head_class]()
    block.build(shape)
    head.build(shape)
    x = tf.constant(np.ones(shape, np.float32))

    def step():
        with tf.GradientTape() as tape:  # the block's backward pass is built first
            first = tape.gradient(tf.reduce_sum(block(x, training=True) ** 2),
                                  block.trainable_variables)
        with tf.GradientTape() as tape:
            tape.watch(x)
            second = tape.gradient(tf.reduce_sum(head(x, training=True) ** 2),
                                   [x] + head.trainable_variables)
        return first + second

    graph = tf.function(step).get_concrete_function().graph

    def ancestors(op):
        seen, todo = set(), [op]
        while todo:
            current = todo.pop()
            for parent in [t.op for t in current.inputs] + list(current.control_inputs):
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return seen

    def is_block_kernel_grad(op):  # a ResNet block's 3x3x3 kernel gradient
        return op.type == "Conv3DBackpropFilterV2" and op.outputs[0].shape[0] == 3

    ops = graph.get_operations()
    head_dx = [op for op in ops if op.type == "Conv3DBackpropInputV2"
               and op.inputs[1].shape[:3] == (1, 1, 1)]
    head_dk = [op for op in ops if op.type == "Conv3DBackpropFilterV2"
               and op.outputs[0].shape[0] == 1]
    assert len(head_dx) == len(head_dk) == 1
    waits = any(is_block_kernel_grad(a) for a in ancestors(head_dx[0]))
    assert waits == (head_class == "head")
    assert not any(is_block_kernel_grad(a) for a in ancestors(head_dk[0]))


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_head_conv_is_keras_conv3d(dtype):
    """HeadConv3D: the values and gradients of a Keras 1x1x1 Conv3D, in training
    (custom gradient) and inference, and its config round-trips."""
    keras.mixed_precision.set_global_policy(dtype)
    rng = np.random.default_rng(14)
    shape = (2, 4, 5, 6, 8)
    ref = keras.layers.Conv3D(3, 1, padding="same", name="ref")
    head = L.HeadConv3D(3, padding="same", name="head")
    ref.build(shape)
    head.build(shape)
    for a, b in zip(ref.weights, head.weights):
        value = rng.normal(size=a.shape).astype(np.float32)
        a.assign(value)
        b.assign(value)
    x = tf.constant(rng.normal(size=shape), ref.compute_dtype)
    w = tf.constant(rng.normal(size=shape[:-1] + (3,)).astype(np.float32))
    results = []
    for layer in (ref, head):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        results.append([y] + grads)
        np.testing.assert_array_equal(layer(x, training=False).numpy(), ref(x).numpy())
    tol = 1e-5 if dtype == "float32" else 1e-2
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.numpy().astype(np.float32),
                                   want.numpy().astype(np.float32), rtol=tol, atol=tol)
    clone = L.HeadConv3D.from_config(head.get_config())
    assert clone.kernel_size == (1, 1, 1) and clone.filters == 3
    with pytest.raises(ValueError, match="1x1x1 stride-1"):
        L.HeadConv3D(3, kernel_size=3)


# ------------------------------------------------------ stem recipe (recompute)
def _stem_pair(shape, filters, groups, rate=0.5, seed=21):
    """(Keras Conv3D, Keras SpatialDropout3D, plain block) and (StemConv3D,
    StemDropout3D, recomputed block) with the same weights and dropout seed."""
    rng = np.random.default_rng(seed)
    chains = []
    for stem in (False, True):
        conv = L.conv3d(filters, 3, name="stem_conv", stem=stem)
        drop = (L.StemDropout3D if stem else keras.layers.SpatialDropout3D)(rate, seed=5)
        block = L.ResNetBlock(filters, groups=groups, recompute=stem, name="blk")
        conv.build(shape)
        block.build(shape[:-1] + (filters,))
        chains.append((conv, drop, block))
    values = [rng.normal(scale=0.3, size=w.shape).astype(np.float32)
              for w in chains[0][0].weights + chains[0][2].weights]
    for conv, _, block in chains:
        for w, value in zip(conv.weights + block.weights, values):
            w.assign(value + (1.0 if "gamma" in w.path else 0.0))
    assert isinstance(chains[1][0], L.StemConv3D)
    return chains


def _stem_step(chain, x, weight):
    """Traced forward + backward of the chain; also the number of ops made
    before the backward pass and the dropout output's name."""
    conv, drop, block = chain
    info = {}

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            stem = drop(conv(x, training=True), training=True)
            y = block(stem, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * weight)
        info["forward_ops"] = len(tf.compat.v1.get_default_graph().get_operations())
        info["stem"] = stem.name
        variables = conv.trainable_variables + block.trainable_variables
        return [y] + tape.gradient(loss, [x] + variables)

    results = run(x)
    return [r.numpy().astype(np.float64) for r in results], run.get_concrete_function(x).graph, info


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_stem_recipe_gives_the_values_and_gradients_of_autodiff(dtype):
    """InitConv + InitDropout + first block under --recompute (the block makes
    the stem's output again from the image in its backward pass) against
    Keras' Conv3D + SpatialDropout3D + autodiff of the plain block: output,
    the image's gradient, and the gradients of the stem's and the block's
    weights; the dropout really drops channels here (rate 0.5)."""
    keras.mixed_precision.set_global_policy(dtype)
    shape = (2, 6, 5, 4, 3)
    rng = np.random.default_rng(22)
    x = tf.constant(rng.normal(size=shape).astype(np.float32), keras.config.floatx())
    weight = tf.constant(rng.normal(size=shape[:-1] + (8,)).astype(np.float32))
    plain, stem = _stem_pair(shape, 8, groups=4)
    (want, _, _), (got, graph, _) = (_stem_step(c, x, weight) for c in (plain, stem))
    # the recipe is used (under mixed precision too): the stem's conv runs twice
    assert sum(op.type == "Conv3D" and op.inputs[1].shape[3] == 3
               for op in graph.get_operations()) == 2
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert len(got) == len(want) == 1 + 1 + 2 + 8
    for i, (g, w) in enumerate(zip(got, want)):
        scale = np.abs(w).max()
        assert scale > 1e-3, i  # every gradient is non-trivial here
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=str(i))


def test_stem_output_is_not_read_by_the_backward_pass():
    """With the recipe no gradient op reads the stem's output (so it is freed
    after the forward pass) and the stem's convolution runs twice; with Keras'
    layers and the same recomputed block, the block's backward pass reads it.
    Checked in the traced graph."""
    shape = (1, 8, 8, 8, 4)
    x = tf.constant(np.random.default_rng(23).normal(size=shape).astype(np.float32))
    weight = tf.ones(shape[:-1] + (8,))
    keras_stem, stem = _stem_pair(shape, 8, groups=4)
    keras_stem = (keras_stem[0], keras_stem[1], stem[2])  # recomputed block, no recipe
    for chain, recipe in ((keras_stem, False), (stem, True)):
        _, graph, info = _stem_step(chain, x, weight)
        ops = graph.get_operations()
        readers = [ops.index(op) for op in graph.get_tensor_by_name(info["stem"]).consumers()]
        assert (max(readers) < info["forward_ops"]) == recipe, (recipe, readers)
        stem_convs = [op for op in ops if op.type == "Conv3D" and op.inputs[1].shape[3] == 4]
        assert len(stem_convs) == (2 if recipe else 1)


def test_stem_dropout_is_keras_spatial_dropout():
    """StemDropout3D draws the same channel mask as Keras' SpatialDropout3D for
    the same seed (training), and is the identity in inference."""
    x = tf.constant(np.random.default_rng(24).normal(size=(3, 4, 4, 4, 16)).astype(np.float32))
    ours, ref = L.StemDropout3D(0.4, seed=9), keras.layers.SpatialDropout3D(0.4, seed=9)
    for _ in range(2):  # successive draws agree too
        want = ref(x, training=True).numpy()
        np.testing.assert_allclose(ours(x, training=True).numpy(), want, rtol=1e-6)
        kept = np.any(want != 0, axis=(1, 2, 3), keepdims=True)  # [B, 1, 1, 1, C]
        # whole channels dropped, the others scaled by 1 / (1 - rate)
        np.testing.assert_allclose(want, np.where(kept, x.numpy() / 0.6, 0.0), rtol=1e-6)
        assert 0 < kept.sum() < kept.size
    np.testing.assert_array_equal(ours(x, training=False).numpy(), x.numpy())
    with pytest.raises(ValueError, match="stride-1 'same'"):
        L.StemConv3D(8, 3, strides=2)


@pytest.mark.parametrize("branch", ["vae", "decoder"])
def test_upsample_recipe_gives_the_values_and_gradients_of_autodiff(branch):
    """A recomputed block after TrilinearUpSampling3D (VBlock) or after its sum
    with skip features (SkipAdd, DecoderBlock) makes its input again from the
    low-resolution tensor: the same output and gradients (low-resolution
    input, skip features, block weights) as Keras' Add and autodiff of the
    plain block, and no gradient op reads the full-resolution input."""
    rng = np.random.default_rng(25)
    low = tf.constant(rng.normal(size=(2, 3, 4, 2, 8)).astype(np.float32))
    skip = tf.constant(rng.normal(size=(2, 6, 8, 4, 8)).astype(np.float32))
    weight = tf.constant(rng.normal(size=(2, 6, 8, 4, 8)).astype(np.float32))
    plain, fused = _block_pair((2, 6, 8, 4, 8), groups=4)
    up = L.TrilinearUpSampling3D(2)
    results = []
    for block, add in ((plain, keras.layers.Add()), (fused, L.SkipAdd())):
        info = {}

        @tf.function
        def run(low, skip):
            with tf.GradientTape() as tape:
                tape.watch([low, skip])
                x = up(low, training=True)
                if branch == "decoder":
                    x = add([x, skip])
                y = block(x, training=True)
                loss = tf.reduce_sum(y * weight) + 0.0 * tf.reduce_sum(skip)
            info["forward_ops"] = len(tf.compat.v1.get_default_graph().get_operations())
            info["input"] = x.name
            return [y] + tape.gradient(loss, [low, skip] + block.trainable_variables)

        results.append([r.numpy().astype(np.float64) for r in run(low, skip)])
        graph = run.get_concrete_function(low, skip).graph
        ops = graph.get_operations()
        readers = [ops.index(op) for op in graph.get_tensor_by_name(info["input"]).consumers()]
        assert (max(readers) < info["forward_ops"]) == (block is fused), readers
        # two resizes forward; with the recipe, two more to remake the input
        # and none more for its gradient (which reads shapes only)
        resizes = sum(op.type == "ResizeBilinear" for op in ops)
        assert resizes == (4 if block is fused else 2), resizes
    want, got = results
    for i, (g, w) in enumerate(zip(got, want)):
        scale = np.abs(w).max()
        assert scale > 1e-3 or (i == 2 and branch == "vae"), i  # skip unused for the VAE
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(scale, 1.0), err_msg=str(i))


@pytest.mark.parametrize("size", [(2, 2, 2), (2, 3, 1), (1, 1, 2), (1, 2, 2), (1, 1, 1)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_upsample_recipe_gradient_is_autodiff(size, dtype):
    """The upsampling recipe's hand-written gradient (its ops in reverse)
    against autodiff of the layer, for anisotropic factors and each dtype."""
    layer = L.TrilinearUpSampling3D(size)
    rng = np.random.default_rng(26)
    x = tf.constant(rng.normal(size=(2, 3, 4, 5, 3)), dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    d = tf.constant(rng.normal(size=y.shape), dtype)
    want = tape.gradient(y, x, output_gradients=d)
    got = layer._upsample_grads([x], d)[0]
    assert got.dtype == want.dtype and got.shape == x.shape
    tol = 1e-2 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=tol, atol=tol)


_STEM_MEMORY = r"""
import sys
import keras
import numpy as np
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)  # as train.py --recompute
from brats_tf import layers as L

stem = sys.argv[1] == "stem"
shape, filters = (1, 32, 32, 32, 4), 16
conv = L.conv3d(filters, 3, name="init", stem=stem)
drop = (L.StemDropout3D if stem else keras.layers.SpatialDropout3D)(0.2, seed=1)
blocks = [L.ResNetBlock(filters, groups=4, recompute=True, name=f"b{i}") for i in range(2)]
conv.build(shape)
for b in blocks:
    b.build(shape[:-1] + (filters,))
x = tf.constant(np.random.default_rng(0).normal(size=shape).astype(np.float32))
variables = conv.trainable_variables + [v for b in blocks for v in b.trainable_variables]

@tf.function
def step(x):
    with tf.GradientTape() as tape:
        y = drop(conv(x, training=True), training=True)
        for b in blocks:
            y = b(y, training=True)
        loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, variables)

step(x)
tf.config.experimental.reset_memory_stats("CPU:0")
base = tf.config.experimental.get_memory_info("CPU:0")["current"]
step(x)
peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
print((peak - base) / (np.prod(shape[:-1]) * filters * 4))
"""


def test_stem_recipe_saves_one_activation():
    """Peak memory of InitConv + InitDropout + two recomputed blocks, forward
    and backward, in activations (allocator statistics, one op at a time):
    with the recipe the stem's output is not alive during the second block's
    backward pass, about one activation less than with Keras' stem layers.
    With TensorFlow's kernel gradient: brats_tf.conv_grad's slab copies put
    the peak elsewhere (0.71 activations less, 6.46 -> 5.75)."""
    keras_stem, stem = (_peak_in_activations(_STEM_MEMORY, mode, kernel_grad="native")
                        for mode in ("keras", "stem"))
    assert stem <= keras_stem - 0.75, (stem, keras_stem)


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
        L.StemConv3D(8, 3, padding="same", name="stem"),
        L.StemDropout3D(0.2, seed=4, name="stem_dropout"),
        L.SkipAdd(name="skip_add"),
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
