"""brats_tf.recompute (train.py --recompute) against autodiff of the plain layers:
the same values and gradients, and the memory it is there to save."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks.reduced_precision import slack
from brats_tf import block_ops
from brats_tf import layers as L
from brats_tf import recompute as R

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first


def _random_block(shape, groups, recompute=False, seed=4, name=None):
    """A built block with random weights (GN gamma around 1, non-zero beta and
    biases); the same weights for the same seed, recomputed or not."""
    rng = np.random.default_rng(seed)
    cls = R.RecomputedResNetBlock if recompute else L.ResNetBlock
    block = cls(shape[-1], groups=groups, name=name)
    block.build(shape)
    for var in block.weights:
        value = rng.normal(scale=0.3, size=var.shape).astype(np.float32)
        var.assign(value + 1.0 if "gamma" in var.path else value)
    return block


def _block_pair(shape, groups, seed=11):
    """Two blocks with the same random weights: plain and recomputed."""
    return (
        _random_block(shape, groups, False, seed, name="plain"),
        _random_block(shape, groups, True, seed, name="recomputed"),
    )


# ------------------------------------------------- recomputed ResNet block
def _block_grads(block, x, weight, graph=True):
    """The block's output in training and the gradients of sum(output * weight)
    with respect to its input and its weights (that order), in float64."""

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = block(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * weight)
        return y, tape.gradient(loss, [x] + block.trainable_variables)

    if graph:  # unknown spatial sizes, as in a traced training step
        run = tf.function(
            run, input_signature=[tf.TensorSpec([None, None, None, None, x.shape[-1]], x.dtype)]
        )
    y, grads = run(x)
    return y.numpy().astype(np.float64), [g.numpy().astype(np.float64) for g in grads]


@pytest.mark.parametrize("graph", [False, True])
def test_recomputed_block_has_the_values_and_gradients_of_autodiff(graph):
    """RecomputedResNetBlock in training (its hand-written backward pass)
    against autodiff of the plain block with the same weights: output, input
    gradient and all eight weight gradients, batch of 2 (per-example GN
    statistics)."""
    shape = (2, 6, 5, 4, 8)
    plain = _random_block(shape, 4, name="plain")
    recomputed = _random_block(shape, 4, recompute=True, name="recomputed")
    rng = np.random.default_rng(12)
    x = tf.constant(rng.normal(size=shape).astype(np.float32))
    weight = tf.constant(rng.normal(size=shape).astype(np.float32))
    want_y, want = _block_grads(plain, x, weight, graph)
    got_y, got = _block_grads(recomputed, x, weight, graph)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-6)
    names = ["input"] + [v.path for v in plain.trainable_variables]
    assert len(got) == len(want) == 9
    for g, w, name in zip(got, want, names):
        scale = np.abs(w).max()
        assert scale > 1e-3, name  # every gradient is non-trivial here
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


def test_recomputed_block_under_mixed_float16():
    """float16 activations and gradients, float32 GN statistics: the
    recomputed block gives the plain block's output and gradients, and both
    are float32's to float16 rounding (relative L2 error of each tensor: a
    float16 kernel gradient is a sum over 512 voxels, which CPUs whose
    float16 convolutions accumulate in float16 may get wrong elementwise)."""
    shape = (1, 8, 8, 8, 16)
    rng = np.random.default_rng(13)
    x32 = rng.normal(size=shape).astype(np.float32)
    weight = tf.constant(rng.normal(size=shape).astype(np.float32))
    ref = _block_grads(_random_block(shape, 8), tf.constant(x32), weight)
    keras.mixed_precision.set_global_policy("mixed_float16")
    results = [
        _block_grads(_random_block(shape, 8, recompute), tf.constant(x32, tf.float16), weight)
        for recompute in (False, True)
    ]
    (plain_y, plain), (y, grads) = results
    np.testing.assert_allclose(y, plain_y, rtol=1e-3, atol=1e-3)
    for g, w in zip(grads, plain):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * np.abs(w).max())
    # Where float16 convolutions accumulate in float16 (Eigen's kernels; e.g.
    # an AMD EPYC, where oneDNN takes no float16), the gradients that pass
    # through conv2's input gradient (432-term float16 sums) err by up to
    # 3.4% here: slack 2.5.
    tol = slack("float16")
    for got, want in zip([y] + grads, [ref[0]] + ref[1]):
        assert np.linalg.norm(got - want) <= 2e-2 * tol * np.linalg.norm(want)


# Prepended to the memory scripts below (tf is looked up when it is called).
_PEAK_IN = r"""
# The allocator's peak during a second call of step(x), above what was held
# before it (TensorFlow's statistics), in units of `unit` bytes.
def peak_in(step, x, unit):
    step(x)
    tf.config.experimental.reset_memory_stats("CPU:0")
    base = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step(x)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return (peak - base) / unit
"""

_CHAIN_MEMORY = r"""
import sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)  # one schedule: comparable peaks
from brats_tf import layers as L
from brats_tf import recompute as R

n, shape = int(sys.argv[1]), (1, 32, 32, 32, 16)
x = tf.constant(np.random.default_rng(0).normal(size=shape).astype(np.float32))

def peak_of(mode):
    cls = R.RecomputedResNetBlock if mode == "recompute" else L.ResNetBlock
    blocks = [cls(16, groups=4, name=f"{mode}{i}") for i in range(n)]
    for b in blocks:
        b.build(shape)
    variables = [v for b in blocks for v in b.trainable_variables]

    def call(block, y):
        if mode == "recompute_grad":  # TensorFlow's generic gradient checkpointing
            return tf.recompute_grad(lambda t: block(t, training=True))(y)
        return block(y, training=True)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = x
            for b in blocks:
                y = call(b, y)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x] + variables)

    return peak_in(step, x, np.prod(shape) * 4)

print(" ".join(str(peak_of(mode)) for mode in sys.argv[2:]))
"""


def _peaks_in_activations(script, *args):
    """The numbers the script prints on its last line (one process: one
    TensorFlow start for every mode it measures)."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1")  # its allocator keeps the statistics
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_IN + script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [float(v) for v in proc.stdout.strip().splitlines()[-1].split()]


def test_recompute_keeps_about_one_activation_per_block():
    """Peak memory of forward + backward through a chain of 6 blocks, in units
    of one activation (TensorFlow's allocator statistics): without recompute
    each block keeps several activations for its backward pass; recomputed,
    only its input, plus the working set of the one block whose gradient is
    being computed (its input, the incoming gradient, two temporaries). With
    one op at a time (measured 38, 24 and 9 activations; with TensorFlow's
    inter-op threads 27, 11 and 9-10) tf.recompute_grad of the same blocks
    holds far more: its recomputed forward keeps its activations for
    autodiff, and it recomputes as soon as a gradient arrives."""
    plain, generic, recomputed = _peaks_in_activations(
        _CHAIN_MEMORY, "6", "plain", "recompute_grad", "recompute"
    )
    assert plain >= 3 * 6, plain
    assert recomputed <= 6 + 5, recomputed
    assert recomputed <= generic - 5, (recomputed, generic)


@pytest.mark.parametrize("head_class", ["conv", "head"])
def test_head_conv_waits_for_the_previous_block(head_class):
    """HeadConv3D's input gradient depends on the backward pass of the recomputed
    block whose gradient was built before it (so two branches' full-size
    gradients are not alive at once); its kernel gradient does not wait. With
    Keras' Conv3D head nothing orders them. Checked in the traced graph."""
    shape = (1, 8, 8, 8, 8)
    block = R.RecomputedResNetBlock(8, groups=2, name="b")
    head = {
        "conv": lambda: keras.layers.Conv3D(2, 1, padding="same", name="h"),
        "head": lambda: R.HeadConv3D(2, padding="same", name="h"),
    }[head_class]()
    block.build(shape)
    head.build(shape)
    x = tf.constant(np.ones(shape, np.float32))

    def step():
        with tf.GradientTape() as tape:  # the block's backward pass is built first
            first = tape.gradient(
                tf.reduce_sum(block(x, training=True) ** 2), block.trainable_variables
            )
        with tf.GradientTape() as tape:
            tape.watch(x)
            second = tape.gradient(
                tf.reduce_sum(head(x, training=True) ** 2), [x] + head.trainable_variables
            )
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
    head_dx = [
        op
        for op in ops
        if op.type == "Conv3DBackpropInputV2" and op.inputs[1].shape[:3] == (1, 1, 1)
    ]
    head_dk = [
        op for op in ops if op.type == "Conv3DBackpropFilterV2" and op.outputs[0].shape[0] == 1
    ]
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
    head = R.HeadConv3D(3, padding="same", name="head")
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
        np.testing.assert_allclose(
            got.numpy().astype(np.float32), want.numpy().astype(np.float32), rtol=tol, atol=tol
        )
    clone = R.HeadConv3D.from_config(head.get_config())
    assert clone.kernel_size == (1, 1, 1) and clone.filters == 3
    with pytest.raises(ValueError, match="1x1x1 stride-1"):
        R.HeadConv3D(3, kernel_size=3)


# ------------------------------------------------------ stem recipe (recompute)
def _stem_pair(shape, filters, groups, rate=0.5, seed=21):
    """(Keras Conv3D, Keras SpatialDropout3D, plain block) and (StemConv3D,
    StemDropout3D, recomputed block) with the same weights and dropout seed."""
    rng = np.random.default_rng(seed)
    chains = []
    for stem in (False, True):
        conv = L.conv3d(
            filters, 3, name="stem_conv", layer_class=R.StemConv3D if stem else keras.layers.Conv3D
        )
        drop = (R.StemDropout3D if stem else keras.layers.SpatialDropout3D)(rate, seed=5)
        block = (R.RecomputedResNetBlock if stem else L.ResNetBlock)(
            filters, groups=groups, name="blk"
        )
        conv.build(shape)
        block.build(shape[:-1] + (filters,))
        chains.append((conv, drop, block))
    values = [
        rng.normal(scale=0.3, size=w.shape).astype(np.float32)
        for w in chains[0][0].weights + chains[0][2].weights
    ]
    for conv, _, block in chains:
        for w, value in zip(conv.weights + block.weights, values):
            w.assign(value + (1.0 if "gamma" in w.path else 0.0))
    assert isinstance(chains[1][0], R.StemConv3D)
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
    assert (
        sum(op.type == "Conv3D" and op.inputs[1].shape[3] == 3 for op in graph.get_operations())
        == 2
    )
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
    ours, ref = R.StemDropout3D(0.4, seed=9), keras.layers.SpatialDropout3D(0.4, seed=9)
    for _ in range(2):  # successive draws agree too
        want = ref(x, training=True).numpy()
        np.testing.assert_allclose(ours(x, training=True).numpy(), want, rtol=1e-6)
        kept = np.any(want != 0, axis=(1, 2, 3), keepdims=True)  # [B, 1, 1, 1, C]
        # whole channels dropped, the others scaled by 1 / (1 - rate)
        np.testing.assert_allclose(want, np.where(kept, x.numpy() / 0.6, 0.0), rtol=1e-6)
        assert 0 < kept.sum() < kept.size
    np.testing.assert_array_equal(ours(x, training=False).numpy(), x.numpy())
    with pytest.raises(ValueError, match="stride-1 'same'"):
        R.StemConv3D(8, 3, strides=2)


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
    results = []
    for block, add, up in (
        (plain, keras.layers.Add(), L.TrilinearUpSampling3D(2)),
        (fused, R.SkipAdd(), R.RecomputedUpSampling3D(2)),
    ):
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
        if block is fused:  # (the plain block's GN keeps its centred input instead)
            assert max(readers) < info["forward_ops"], readers
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
    layer = R.RecomputedUpSampling3D(size, dtype=dtype)  # no cast to float32 on the way in
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
from brats_tf import recompute as R

shape, filters = (1, 32, 32, 32, 4), 16
x = tf.constant(np.random.default_rng(0).normal(size=shape).astype(np.float32))

def peak_of(mode):
    stem = mode == "stem"
    conv = L.conv3d(
        filters, 3, name=f"init_{mode}", layer_class=R.StemConv3D if stem else keras.layers.Conv3D
    )
    drop = (R.StemDropout3D if stem else keras.layers.SpatialDropout3D)(0.2, seed=1)
    blocks = [R.RecomputedResNetBlock(filters, groups=4, name=f"{mode}{i}") for i in range(2)]
    conv.build(shape)
    for b in blocks:
        b.build(shape[:-1] + (filters,))
    variables = conv.trainable_variables + [v for b in blocks for v in b.trainable_variables]

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            y = drop(conv(x, training=True), training=True)
            for b in blocks:
                y = b(y, training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, variables)

    return peak_in(step, x, np.prod(shape[:-1]) * filters * 4)

print(" ".join(str(peak_of(mode)) for mode in sys.argv[1:]))
"""


def test_stem_recipe_saves_one_activation():
    """Peak memory of InitConv + InitDropout + two recomputed blocks, forward
    and backward, in activations (allocator statistics, one op at a time):
    with the recipe the stem's output is not alive during the second block's
    backward pass, about one activation less than with Keras' stem layers.
    """
    keras_stem, stem = _peaks_in_activations(_STEM_MEMORY, "keras", "stem")
    assert stem <= keras_stem - 0.75, (stem, keras_stem)


@pytest.mark.parametrize(
    "layer",
    [
        R.RecomputedResNetBlock(16, groups=4, l2_weight=1e-5, name="blk"),
        R.RecomputedUpSampling3D((2, 3, 1), name="up"),
        R.StemConv3D(8, 3, padding="same", name="stem"),
        R.StemDropout3D(0.2, seed=4, name="stem_dropout"),
        R.SkipAdd(name="skip_add"),
        R.HeadConv3D(3, padding="same", name="head"),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_group_norm_backward_matches_float64(offset):
    """The recomputed blocks' hand-written GroupNorm backward pass (centred
    sums) against the textbook gradient in float64 NumPy, for inputs far from
    0 too (no cancellation: the error does not grow with the mean), with and
    without a residual gradient added."""
    from test_layers import _group_norm_grads_np

    shape, groups = (2, 16, 12, 8, 16), 4
    rng = np.random.default_rng(31)
    x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
    gamma = rng.normal(size=shape[-1]).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    residual = rng.normal(size=shape).astype(np.float32)
    mean, rstd = block_ops.gn_statistics(tf.constant(x), groups, 1e-5)
    want = _group_norm_grads_np(
        x.astype(np.float64), gamma.astype(np.float64), dy.astype(np.float64), groups
    )
    for d_residual in (None, residual):
        got = block_ops.gn_backward(
            tf.constant(dy),
            tf.constant(x),
            mean,
            rstd,
            tf.constant(gamma),
            groups,
            None if d_residual is None else tf.constant(d_residual),
        )
        expected = [want[0] + (0 if d_residual is None else residual), want[1], want[2]]
        for g, w in zip(got, expected):
            assert np.abs(g.numpy() - w).max() <= 2e-6 * np.abs(w).max()


def test_a_recomputing_model_saves_and_loads_as_the_same_network(tmp_path):
    """A .keras file of a model trained with --recompute loads without
    custom_objects (its layers are registered) into the same classes, with
    the same outputs."""
    from brats_tf.config import ModelConfig
    from brats_tf.model import build_model

    cfg = ModelConfig(
        input_shape=(16, 16, 16),
        init_filters=8,
        latent_dim=4,
        blocks_down=(1, 1),
        blocks_up=(1,),
        recompute_levels=1,
        seed=1,
    )
    model = build_model(cfg)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("EncoderBlock0_0")) is R.RecomputedResNetBlock
    assert type(loaded.get_layer("Vend")) is R.HeadConv3D
    x = np.random.default_rng(40).normal(size=(1, 16, 16, 16, 4)).astype(np.float32)
    np.testing.assert_allclose(loaded(x)["seg"].numpy(), model(x)["seg"].numpy(), atol=1e-6)
