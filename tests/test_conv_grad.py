"""brats_tf.conv_grad (the kernel gradient as one matrix product) and the
layers that use it, against float64 NumPy and TensorFlow's own gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from brats_tf import conv_grad, cpu
from brats_tf import layers as L


def _kernel_grad_np(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dk[a, b, c] = sum_n x[n + (a, b, c) - 1] dy[n], x zero-padded, float64."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    _, d, h, w, _ = x.shape
    xp = np.pad(x, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
    out = np.zeros((3, 3, 3, x.shape[-1], dy.shape[-1]))
    for a in range(3):
        for b in range(3):
            for c in range(3):
                out[a, b, c] = np.einsum("ndhwi,ndhwo->io",
                                         xp[:, a:a + d, b:b + h, c:c + w], dy)
    return out


def _native(x, dy):
    return tf.raw_ops.Conv3DBackpropFilterV2(
        input=x, filter_sizes=[3, 3, 3, x.shape[-1], dy.shape[-1]], out_backprop=dy,
        strides=[1] * 5, padding="SAME")


@pytest.mark.parametrize("shape,out_channels,slab_bytes", [
    ((1, 6, 5, 7, 3), 4, None),          # one slab, odd non-cubic sizes
    ((2, 7, 4, 6, 5), 2, 1),             # one depth plane per slab, batch 2
    ((1, 9, 6, 5, 4), 6, 30_000),        # slabs of a few planes, a short last one
])
def test_kernel_grad_matches_numpy(monkeypatch, shape, out_channels, slab_bytes):
    if slab_bytes is not None:
        monkeypatch.setattr(conv_grad, "SLAB_BYTES", slab_bytes)
        monkeypatch.setattr(conv_grad, "MIN_SLAB_BYTES", 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape[:4] + (out_channels,)).astype(np.float32)
    planes = conv_grad._slab_planes(shape, out_channels)
    if slab_bytes is not None:
        assert planes < shape[1]  # really more than one slab
    want = _kernel_grad_np(x, dy)
    got = conv_grad.conv3d_kernel_grad(tf.constant(x), tf.constant(dy)).numpy()
    assert got.shape == want.shape
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got, _native(x, dy).numpy(), rtol=0, atol=1e-5 * scale)


def test_kernel_grad_in_a_traced_function_with_many_slabs(monkeypatch):
    monkeypatch.setattr(conv_grad, "SLAB_BYTES", 50_000)
    monkeypatch.setattr(conv_grad, "MIN_SLAB_BYTES", 0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 12, 8, 8, 16)).astype(np.float32)
    dy = rng.standard_normal((1, 12, 8, 8, 16)).astype(np.float32)
    fn = tf.function(conv_grad.conv3d_kernel_grad)
    got = fn(tf.constant(x), tf.constant(dy)).numpy()
    want = _kernel_grad_np(x, dy)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    graph = fn.get_concrete_function(tf.constant(x), tf.constant(dy)).graph
    types = [op.type for op in graph.get_operations()]
    assert "Conv3DBackpropFilterV2" not in types
    assert types.count("MatMul") == -(-12 // conv_grad._slab_planes(x.shape, 16))


def test_slab_planes():
    def plane_bytes(h, w, cin, cout):
        return (h + 2) * (w + 2) * (9 * cin + 3 * cout) * 4

    # 64^3 x 32 channels: one activation (32 MiB) of copies, 5 planes
    assert conv_grad._slab_planes((1, 64, 64, 64, 32), 32) == \
        64**3 * 32 * 4 // plane_bytes(64, 64, 32, 32) == 5
    # the paper crop's full resolution: SLAB_BYTES (128 MiB), 3 planes
    assert conv_grad._slab_planes((1, 160, 192, 128, 32), 32) == \
        128 * 2**20 // plane_bytes(192, 128, 32, 32) == 3
    # small volumes: at least MIN_SLAB_BYTES (32 MiB), here the whole volume
    assert conv_grad._slab_planes((1, 16, 16, 16, 128), 128) == \
        32 * 2**20 // plane_bytes(16, 16, 128, 128) >= 16
    # never less than a plane
    assert conv_grad._slab_planes((1, 4, 2048, 2048, 64), 64) == 1


def test_applies():
    def spec(shape, dtype=tf.float32):
        return tf.zeros(shape, dtype)

    assert conv_grad.applies(spec((1, 32, 32, 32, 16)), (3, 3, 3, 16, 16))
    assert conv_grad.applies(spec((1, 16, 16, 16, 128)), (3, 3, 3, 128, 128))  # grid 1.42x
    assert not conv_grad.applies(spec((1, 8, 8, 8, 256)), (3, 3, 3, 256, 256))  # grid 1.95x
    assert not conv_grad.applies(spec((1, 32, 32, 32, 4)), (3, 3, 3, 4, 32))  # the stem
    assert not conv_grad.applies(spec((1, 32, 32, 32, 32)), (1, 1, 1, 32, 3))
    assert not conv_grad.applies(spec((1, 32, 32, 32, 32), tf.float16), (3, 3, 3, 32, 32))
    assert not conv_grad.applies(spec((1, 32, 32, 32, 32), tf.bfloat16), (3, 3, 3, 32, 32))

    @tf.function(input_signature=[tf.TensorSpec([1, None, 32, 32, 32])])
    def dynamic(x):
        assert not conv_grad.applies(x, (3, 3, 3, 32, 32))
        return x

    dynamic.get_concrete_function()


def test_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("BRATS_TF_KERNEL_GRADIENT", "native")
    assert conv_grad.kernel_gradient_mode() == "native"
    monkeypatch.setenv("BRATS_TF_KERNEL_GRADIENT", " MatMul ")
    assert conv_grad.kernel_gradient_mode() == "matmul"
    assert conv_grad.kernel_gradient_mode(recompute=True) == "matmul"
    monkeypatch.setenv("BRATS_TF_KERNEL_GRADIENT", "auto")
    gpu = bool(tf.config.list_logical_devices("GPU"))
    for prefers in (True, False):
        # auto follows the CPU's kind (cpu_prefers_matmul, tested below).
        monkeypatch.setattr(conv_grad, "_this_cpu_prefers_matmul", lambda: prefers)
        want = "matmul" if prefers and not gpu else "native"
        assert conv_grad.kernel_gradient_mode() == want
        assert conv_grad.kernel_gradient_mode(recompute=True) == "native"
        monkeypatch.delenv("BRATS_TF_KERNEL_GRADIENT")
        assert conv_grad.kernel_gradient_mode() == want
        monkeypatch.setenv("BRATS_TF_KERNEL_GRADIENT", "auto")
    monkeypatch.setenv("BRATS_TF_KERNEL_GRADIENT", "cudnn")
    with pytest.raises(ValueError, match="BRATS_TF_KERNEL_GRADIENT='cudnn'"):
        conv_grad.kernel_gradient_mode()


_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl
bogomips\t: 4200.00

processor\t: 1
flags\t\t: fpu sse2
"""


def test_cpu_flags_come_from_the_first_flags_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(_CPUINFO)
    assert cpu.cpu_flags(str(path)) == {"fpu", "sse2", "avx", "avx2", "fma", "avx512f",
                                        "avx512dq", "avx512bw", "avx512vl"}
    # An ARM cpuinfo names them "Features"; no file at all: unknown.
    path.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert cpu.cpu_flags(str(path)) is None
    assert cpu.cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("machine, flags, want", [
    ("x86_64", "sse2 avx avx2 fma", True),                        # AVX2: the AMD EPYC (Zen 3)
    ("AMD64", "avx2", True),                                      # Windows' name for x86-64
    ("x86_64", "avx2 avx512f avx512dq avx512bw avx512vl", False),  # AVX-512 Xeon
    # AVX-512F without BW/VL (Knights Landing): not oneDNN's avx512_core,
    # whose kernel gradient is the fast one
    ("x86_64", "avx2 avx512f avx512cd", True),
    ("x86_64", "sse2 avx", False),                                # no AVX2: never measured
    ("aarch64", "avx2", False),                                   # not x86
    ("x86_64", None, False),                                      # flags unknown
])
def test_cpu_prefers_matmul(machine, flags, want):
    flags = None if flags is None else frozenset(flags.split())
    assert conv_grad.cpu_prefers_matmul(machine, flags) is want


def _conv_grads(layer, x, training=True):
    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * tf.cos(y))  # a non-trivial output gradient
        return (y,) + tuple(tape.gradient(loss, [x, layer.kernel, layer.bias]))

    graph = run.get_concrete_function(x).graph
    return [t.numpy() for t in run(x)], [op.type for op in graph.get_operations()]


@pytest.mark.parametrize("mode", ["matmul", "native"])
def test_conv3d_layer_matches_keras(monkeypatch, mode):
    """brats_tf's Conv3D: Keras Conv3D's values and gradients in both modes;
    in 'matmul' mode the training graph has no TensorFlow kernel gradient."""
    monkeypatch.setenv("BRATS_TF_KERNEL_GRADIENT", mode)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((1, 16, 16, 14, 16)).astype(np.float32))
    ours = L.conv3d(8, 3, name="ours")
    ref = keras.layers.Conv3D(8, 3, padding="same", name="ref")
    assert type(ours) is L.Conv3D
    ours.build(x.shape)
    ref.build(x.shape)
    ref.kernel.assign(ours.kernel)
    ref.bias.assign(rng.standard_normal(8).astype(np.float32))
    ours.bias.assign(ref.bias)
    got, types = _conv_grads(ours, x)
    want, _ = _conv_grads(ref, x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.abs(w).max())
    assert ("Conv3DBackpropFilterV2" in types) == (mode == "native")
    # Outside training, and for strided or 1x1x1 convolutions: Keras's layer.
    _, types = _conv_grads(ours, x, training=False)
    assert "Conv3DBackpropFilterV2" in types
    for layer in (L.conv3d(8, 3, strides=2, name="down"), L.conv3d(8, 1, name="one")):
        _, types = _conv_grads(layer, x)
        assert "Conv3DBackpropFilterV2" in types
    clone = L.Conv3D.from_config(ours.get_config())
    assert type(clone) is L.Conv3D and clone.kernel_size == (3, 3, 3)


def test_resnet_block_gradients_match_between_modes(monkeypatch):
    """A block with 16 channels (so its kernel gradients take the matmul path),
    plain and recomputed, against the block under TensorFlow's kernel gradient;
    under 'auto' the recomputed block keeps TensorFlow's."""
    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((1, 16, 16, 16, 16)).astype(np.float32))
    results = {}
    # auto as on a CPU where the product is the faster (x86 with AVX2 only)
    monkeypatch.setattr(conv_grad, "_this_cpu_prefers_matmul", lambda: True)
    for mode in ("native", "matmul", "auto"):
        monkeypatch.setenv("BRATS_TF_KERNEL_GRADIENT", mode)
        for recompute in (False, True):
            keras.utils.set_random_seed(4)
            block = L.ResNetBlock(16, recompute=recompute)
            block.build(x.shape)

            @tf.function
            def run(x):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = block(x, training=True)
                    loss = tf.reduce_sum(y * tf.sin(y))
                return [y] + tape.gradient(loss, [x] + block.trainable_weights)

            graph = run.get_concrete_function(x).graph
            n_native = sum(op.type == "Conv3DBackpropFilterV2" for op in graph.get_operations())
            uses_native = mode == "native" or (mode == "auto" and recompute)
            assert n_native == (2 if uses_native else 0), (mode, recompute)
            results[mode, recompute] = [t.numpy() for t in run(x)]
    want = results["native", False]
    for key, got in results.items():
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=5e-5 * np.abs(w).max(), err_msg=str(key))
