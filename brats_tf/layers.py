"""Reusable layers of the network (paper §3, Fig. 1, Table 1).

Tensor layout everywhere: [B, D, H, W, C] (channels last). Every layer here is
serialisable (complete ``get_config``) and registered under the ``brats_tf``
package name, so ``.keras`` files load without ``custom_objects``.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from brats_tf import conv_grad

_PACKAGE = "brats_tf"


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def conv3d(
    filters: int,
    kernel_size: int = 3,
    strides: int = 1,
    l2_weight: float = 0.0,
    name: str | None = None,
    dtype=None,
    head: bool = False,
    stem: bool = False,
) -> keras.layers.Conv3D:
    """The paper's convolution: 'same' padding, bias, L2 on the kernel (§3.5).

    ``kernel_size=1`` is the paper's "Conv1". Kernels start Glorot-uniform,
    TensorFlow's default (the paper names no initialiser); He-normal makes the
    un-normalised residual sums blow the initial logits up (std ~15-20 at
    init vs ~2.5, measured with tests/test_model.py's tiny model).
    ``head=True`` (a 1x1x1 output head under --recompute) makes it a
    ``HeadConv3D``: the same convolution with a memory-ordered gradient.
    ``stem=True`` (InitConv under --recompute) makes it a ``StemConv3D``: the
    same convolution, whose output the first recomputed block can make again.
    Otherwise it is a ``Conv3D``: Keras's, with a faster kernel gradient on
    CPUs.
    """
    if head and stem:
        raise ValueError(f"conv3d {name!r}: head and stem exclude each other")
    regularizer = keras.regularizers.L2(l2_weight) if l2_weight else None
    cls = HeadConv3D if head else StemConv3D if stem else Conv3D
    return cls(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer="glorot_uniform",
        kernel_regularizer=regularizer,
        name=name,
        dtype=dtype,
    )


def _spatial_sum(x: tf.Tensor) -> tf.Tensor:
    """Sum of [B, D, H, W, C] over D, H, W: [B, C].

    First over H as a batch of matrix-vector products, ones[H] @ x[H, W C]
    for each (b, d), then the small [B, D, W, C] result over D and over W.
    A single float32 reduce_sum over the ~10^7 voxels of a full-size volume
    accumulates rounding error (relative 2e-5 on a 240x240x160x8 tensor);
    these three short sums are as accurate as three axis-by-axis reduce_sums
    (~1e-7 against float64), which however read the whole tensor at 2-4 GB/s
    in TensorFlow's CPU kernel: the products took 3.4-3.7 against 9-15 ms at
    64^3 x 32, 63 against 127-191 ms at 160x192x128x32 on the AVX2 EPYC, and
    a training step runs this 3x for every GroupNorm (one product over all of
    D H, ones[D H] @ x[D H, W C], was as fast but 5x less accurate on
    zero-mean data: 5e-6). tests/test_layers.py checks it against float64.

    Where TensorFlow sees a GPU, the three reduce_sums: there they are fast,
    and a float32 product may run in TF32 (10-bit mantissa) on Ampere and
    later GPUs. Decided when the graph is traced: a SavedModel exported on a
    CPU keeps the products if served on a GPU (where float32 convolutions
    may run in TF32 too).
    """
    if tf.config.list_logical_devices("GPU"):
        return tf.reduce_sum(tf.reduce_sum(tf.reduce_sum(x, axis=1), axis=1), axis=1)
    shape = tf.shape(x)
    channels = x.shape[-1]
    rows = tf.reshape(x, tf.stack([shape[0] * shape[1], shape[2], shape[3] * channels]))
    ones = tf.ones(tf.stack([1, 1, shape[2]]), x.dtype)
    per_dw = tf.reshape(tf.linalg.matmul(ones, rows),
                        tf.stack([shape[0], shape[1], shape[3], channels]))
    return tf.reduce_sum(tf.reduce_sum(per_dw, axis=1), axis=1)


def _channel_dot(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """sum over D, H, W of a * b, both [B, D, H, W, C]: [B, C], float32.

    The diagonal of a (C x voxels) by (voxels x C) matrix product: no
    full-size a * b temporary, and, blocked like any GEMM, as accurate as the
    axis-by-axis sums of ``_spatial_sum`` (relative 6e-7 at 80x96x64x32 with
    an offset of 50, against float64; tests/test_layers.py). 2 C^2 flops a
    voxel: 0.1% of the block's convolutions at C = 32.
    """
    shape = tf.shape(a)
    channels = a.shape[-1]
    product = tf.linalg.matmul(tf.reshape(a, [shape[0], -1, channels]),
                               tf.reshape(b, [shape[0], -1, channels]), transpose_a=True)
    return tf.linalg.diag_part(product)


def _group_mean(per_channel_sum: tf.Tensor, count, groups: int) -> tf.Tensor:
    """[B, C] per-channel sums -> [B, 1, 1, 1, C] means of each channel's group."""
    per_group = per_channel_sum.shape[-1] // groups
    sums = tf.reduce_sum(tf.reshape(per_channel_sum, (-1, groups, per_group)), -1, keepdims=True)
    # Each group's mean for each of its channels: a broadcast, not tf.repeat
    # (29 graph ops; GroupNorm's forward and backward called it 62 times).
    shape = [tf.shape(per_channel_sum)[0], groups, per_group]
    means = tf.reshape(tf.broadcast_to(sums / count, shape), (-1, groups * per_group))
    return means[:, None, None, None, :]


def _gn_statistics(x: tf.Tensor, groups: int, epsilon: float):
    """Group mean and 1/std of float32 [B, D, H, W, C], each [B, 1, 1, 1, C].

    Two passes (mean, then mean squared deviation: no cancellation), sums
    taken axis by axis (``_spatial_sum``). Also returns the voxel count of a
    group, which the backward pass needs.
    """
    per_group = x.shape[-1] // groups
    count = tf.cast(tf.reduce_prod(tf.shape(x)[1:4]) * per_group, tf.float32)
    mean = _group_mean(_spatial_sum(x), count, groups)
    var = _group_mean(_spatial_sum(tf.math.squared_difference(x, mean)), count, groups)
    return mean, tf.math.rsqrt(var + epsilon), count


def _gn_affine(x, mean, rstd, gamma, beta):
    """GroupNorm(x) * gamma + beta from known group statistics: one fused
    ``x * a + b`` with per-channel a, b, in float32."""
    scale = rstd * gamma
    return tf.cast(x, tf.float32) * scale + (beta - mean * scale)


def _gn_apply(x, mean, rstd, gamma, beta, dtype):
    """``_gn_affine`` cast to dtype."""
    return tf.cast(_gn_affine(x, mean, rstd, gamma, beta), dtype)


_FUSED_ENV = "BRATS_TF_FUSED_ELEMENTWISE"


def fused_elementwise(recompute: bool = False) -> bool:
    """Whether GroupNorm's elementwise tails are compiled by XLA in training
    (``_fused``): ``BRATS_TF_FUSED_ELEMENTWISE`` = ``auto`` (the default: yes
    where TensorFlow sees no GPU, except in the recomputed blocks of
    ``--recompute``, ``recompute=True``), ``on`` or ``off``. The recomputed
    blocks' point is memory, and XLA's outputs cannot reuse their inputs'
    buffers as TensorFlow's elementwise ops do: with them the paper crop's
    recomputed step (4 levels) peaked at 4.79 instead of 4.44 GiB of tensors,
    6.84 instead of 6.28 GiB RSS. Read when a training step is traced."""
    mode = os.environ.get(_FUSED_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{_FUSED_ENV}={mode!r}: expected one of auto, on, off")
    if mode == "auto":
        return not recompute and not tf.config.list_logical_devices("GPU")
    return mode == "on"


def _fused(fn):
    """``fn``, elementwise ops over full-size tensors with per-channel
    operands, compiled by XLA into one loop when
    ``fused_elementwise(recompute)``, else ``fn`` itself; the returned
    function takes ``recompute=True`` in a recomputed block. For the
    training step only.

    TensorFlow's CPU kernels make one pass over memory per op: GroupNorm's
    ``x * a + b`` and cast are two passes (three with the ReLU of a
    recomputed block), its backward pass's ``dy * scale - (x * -a - b)``
    plus the residual's gradient four. XLA fuses each into one: 0.15 ->
    0.05 s and 0.26 -> 0.08 s at the paper crop's full resolution
    (160x192x128x32, 2 cores of the AVX-512 Xeon). Only these small
    functions are compiled: XLA makes the 3-D convolutions 7-9x slower on
    the CPU. Not used in inference: a SavedModel holding XLA clusters needs
    TF Serving's XLA:CPU JIT, which is off by default there. On GPUs the
    step is compiled whole (``--jit_compile``) or not at all, as measured
    there. XLA may contract a * b + c into one FMA, so values can differ
    from TensorFlow's ops in the last bit (WORKSPACE.md deviation 26)."""
    compiled = tf.function(fn, jit_compile=True, autograph=False)

    def call(*args, recompute: bool = False):
        return compiled(*args) if fused_elementwise(recompute) else fn(*args)

    return call


def _gn_backward(d_outputs, inputs, mean, rstd, gamma, count, groups: int, d_residual=None,
                 recompute: bool = False):
    """Gradients of y = GN(inputs) * gamma + beta (the textbook GN gradient).

    y = xhat * gamma + beta, xhat = (x - mean) * rstd per group;
    dx = rstd * (dxhat - <dxhat> - xhat * <dxhat * xhat>), <.> the group
    mean, dxhat = dy * gamma. Written as dy * scale + x * a + b with
    per-channel a, b. The per-channel sums of dy and of dy * (x - mean) are
    taken without a full-size temporary (``_channel_dot``, and sum(dy * x) -
    mean * sum(dy)), and the products can reuse the buffers of dy and x when
    nothing else reads them: at most one full-size temporary, where autodiff
    of the forward keeps about five. ``d_residual`` (optional) is added to
    d_inputs in place: the gradient of a residual connection around the
    layer; ``recompute``: in a recomputed block (``fused_elementwise``).
    Returns (d_inputs in the inputs' dtype, d_gamma, d_beta).
    """
    dy = tf.cast(d_outputs, tf.float32)
    # Only forward values: without the dependency on dy the executor may
    # make the cast (a copy under mixed precision) long before this gradient
    # arrives (at the recompute peak, two layers' copies were alive).
    with tf.control_dependencies([dy]):
        x = tf.cast(inputs, tf.float32)
    mean_c, rstd_c = mean[:, 0, 0, 0, :], rstd[:, 0, 0, 0, :]
    sum_dy = _spatial_sum(dy)  # [B, C]
    sum_dy_x = _channel_dot(dy, x)  # [B, C]
    sum_dy_xc = sum_dy_x - mean_c * sum_dy
    d_gamma = tf.reduce_sum(rstd_c * sum_dy_xc, 0)
    d_beta = tf.reduce_sum(sum_dy, 0)
    mean_dxhat = _group_mean(gamma * sum_dy, count, groups)
    mean_dxhat_xhat = _group_mean(gamma * rstd_c * sum_dy_xc, count, groups)
    a = -rstd * rstd * mean_dxhat_xhat
    b = -rstd * mean_dxhat - mean * a
    scale = rstd * gamma
    # After the sums, dy (and x, if nothing else holds it) have no other
    # reader, so the products below can reuse their buffers (TensorFlow
    # forwards an input whose only reference is the op); without the
    # dependency the executor may run dy * scale first. Subtractions, not
    # additions: grappler's AddOpsRewrite turns a chain of adds into an AddN
    # with a full-size accumulator (seen in the memory profile).
    with tf.control_dependencies([sum_dy, sum_dy_x]):
        if d_residual is None:
            d_inputs = _gn_input_grad(dy, x, scale, a, b, inputs.dtype, recompute=recompute)
        else:
            d_inputs = _gn_input_grad_residual(dy, x, scale, a, b, d_residual,
                                               recompute=recompute)
    return d_inputs, d_gamma, d_beta


def _input_grad(dy, x, scale, a, b, dtype):
    """GroupNorm's input gradient from the per-channel a, b (``_gn_backward``)."""
    return tf.cast(dy * scale - (x * -a - b), dtype)


def _input_grad_residual(dy, x, scale, a, b, d_residual):
    """``_input_grad`` plus a residual connection's gradient, in its dtype.
    One add, not a chain: no AddN rewrite outside XLA."""
    return tf.add(_input_grad(dy, x, scale, a, b, d_residual.dtype), d_residual)


_gn_input_grad = _fused(_input_grad)
_gn_input_grad_residual = _fused(_input_grad_residual)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GroupNorm(keras.layers.Layer):
    """Group normalisation (Wu & He 2018) of [B, D, H, W, C], channels last.

    The same function as ``keras.layers.GroupNormalization(groups, axis=-1)``
    (per example, the C channels are split into ``groups`` contiguous groups;
    each group is normalised over its spatial voxels and channels, then a
    per-channel gamma and beta are applied), computed with fewer passes over
    the 5-D tensor: the group statistics come from per-channel sums, and the
    output is one fused ``x * a + b`` with per-channel a, b. The backward
    pass is written by hand (``tf.custom_gradient``, the textbook GN
    gradient, checked against float64 NumPy in tests/test_layers.py): it
    keeps only the input and the per-channel statistics from the forward pass
    and makes two full-size temporaries, where autodiff of the forward kept
    about five. On this CPU that took the paper-crop training step from 38.9
    to 34.8 s, and the step's tensor peak at 80x96x64 from 32 to 24
    full-resolution activations (TensorFlow's allocator statistics;
    benchmarks/model_step.py). Already with autodiff, a forward + backward
    pass of GN + ReLU at 64^3 x 32 took 76 ms instead of 142 ms for the
    Keras layer.

    The statistics are ALWAYS float32 (two-pass mean, then mean squared
    deviation, so no cancellation; sums taken axis by axis, see
    ``_spatial_sum``), also under a mixed_float16 policy where the variance
    of float16 activations can overflow; the output has the layer's compute
    dtype.
    """

    def __init__(self, groups: int = 8, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.groups = _check_positive_int("groups", groups)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        if len(input_shape) != 5:
            raise ValueError(f"{self.name} expects [B, D, H, W, C], got shape {input_shape}")
        channels = input_shape[-1]
        if channels is None or channels % self.groups:
            raise ValueError(
                f"{self.name}: channels={channels} is not divisible by groups={self.groups}"
            )
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")
        self.built = True

    def call(self, inputs, training=None):
        groups, epsilon, compute_dtype = self.groups, self.epsilon, self.compute_dtype
        apply = _gn_apply_fused if training else _gn_apply

        @tf.custom_gradient
        def group_norm(inputs, gamma, beta):
            x = tf.cast(inputs, tf.float32)
            mean, rstd, count = _gn_statistics(x, groups, epsilon)
            outputs = apply(x, mean, rstd, gamma, beta, compute_dtype)

            def grad(d_outputs):
                return _gn_backward(d_outputs, inputs, mean, rstd, gamma, count, groups)

            return outputs, grad

        return group_norm(inputs, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32))

    def relu_of(self, inputs):
        """ReLU(self(inputs)) outside training, in one float32 expression
        with the ReLU before the cast to the compute dtype (``_norm_relu``):
        the same values, no gradient bookkeeping."""
        x = tf.cast(inputs, tf.float32)
        mean, rstd, _ = _gn_statistics(x, self.groups, self.epsilon)
        return _norm_relu(x, mean, rstd, tf.cast(self.gamma, tf.float32),
                          tf.cast(self.beta, tf.float32), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups, epsilon=self.epsilon)
        return config


_STRIDES_1 = [1, 1, 1, 1, 1]


def _conv_same(x, kernel, bias):
    """A stride-1 'same' convolution with bias (Keras Conv3D's ops)."""
    return tf.nn.bias_add(tf.nn.conv3d(x, kernel, _STRIDES_1, "SAME"), bias)


def _norm_relu(x, mean, rstd, gamma, beta, dtype):
    """ReLU(GroupNorm(x)) from known group statistics, computed in float32 and
    cast to dtype after the ReLU: the same values as a ReLU after the cast
    (the cast keeps signs and zeros), and under mixed_bfloat16 a float32 ReLU
    is much faster on the CPU than Eigen's bfloat16 one (0.59 s of a 3.7 s
    brain-box inference before)."""
    return tf.cast(tf.nn.relu(_gn_affine(x, mean, rstd, gamma, beta)), dtype)


_gn_apply_fused = _fused(_gn_apply)
_norm_relu_fused = _fused(_norm_relu)


def _conv_kernel_grad(x, kernel, dy, recompute: bool = False):
    """Kernel gradient of a stride-1 'same' convolution of x: one matrix
    product (``conv_grad.conv3d_kernel_grad``) where that is faster, i.e. on
    CPUs, for float32 3x3x3 kernels of 16+ input channels on volumes of 16^3
    or so and more (``conv_grad.use_matmul``), else autodiff's op. In a
    recomputed block (``recompute``) autodiff's op unless
    BRATS_TF_KERNEL_GRADIENT=matmul (``conv_grad.kernel_gradient_mode``)."""
    if conv_grad.use_matmul(x, kernel.shape, recompute):
        return conv_grad.conv3d_kernel_grad(x, dy)
    return tf.raw_ops.Conv3DBackpropFilterV2(
        input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=_STRIDES_1,
        padding="SAME")


def _conv_input_grad(x, kernel, dy):
    """Input gradient of a stride-1 'same' convolution of x (only x's shape is read)."""
    return tf.raw_ops.Conv3DBackpropInputV2(
        input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=_STRIDES_1,
        padding="SAME")


def _graph_state(graph, name: str) -> dict:
    """A dict kept in a traced graph (one of its collections), for the
    recompute bookkeeping below.

    In the graph, so that it lives and goes with the graph, rather than in a
    module-level dict keyed by the graph whose values (the graph's tensors)
    refer back to it. (Graph-mode ``tf.custom_gradient`` itself keeps traced
    graphs alive through TensorFlow's gradient registry.)
    """
    collection = graph.get_collection_ref(name)
    if not collection:
        collection.append({})
    return collection[0]


def _previous_backward(dy: tf.Tensor) -> list:
    """The outputs of the last recomputed block backward pass traced into this
    graph on this device, or [] (eager, or the first).

    Each recomputed block's backward pass waits for them, so these passes run
    one after the other in the order autodiff makes them. Without this the
    executor, which may start any op whose inputs are ready, interleaved the
    segmentation decoder's and the VAE's full-resolution blocks (their
    incoming gradients are ready at once), and both blocks' working tensors
    were alive together (benchmarks/profile_step.py --memory); at the paper
    crop with 2 levels the tensor peak fell from 7.9 to 7.0 GiB with this. The order cannot make a
    cycle: a pass traced earlier was built before this one's outputs existed.
    Per device, so that replicas (MirroredStrategy) are not serialised.
    """
    if tf.executing_eagerly():
        return []
    return _graph_state(dy.graph, "_brats_tf_last_backward").get(dy.device, [])


def _record_backward(dy: tf.Tensor, grads) -> None:
    """Records the outputs of the recomputed block backward pass just traced
    (graph -> {device: its gradients}); see _previous_backward."""
    if not tf.executing_eagerly():
        _graph_state(dy.graph, "_brats_tf_last_backward")[dy.device] = list(grads)


class _Recipe:
    """How to make a tensor again in the backward pass from smaller tensors,
    and how to pass its gradient on to them.

    ``inputs``: the tensors it is made from (kept for the backward pass);
    ``make(*inputs)``: the tensor again; ``grads(inputs, d)``: the gradients
    of ``inputs`` given the tensor's gradient d (None where no gradient
    exists, e.g. a random mask).
    """

    def __init__(self, inputs, make, grads):
        self.inputs, self.make, self.grads = list(inputs), make, grads


def _register_recipe(tensor: tf.Tensor, recipe: _Recipe) -> None:
    """Records how to make ``tensor`` again (graph -> {tensor name: recipe}).
    A recomputed ResNet block whose input has a recipe keeps the recipe's
    inputs instead of its own input (see StemConv3D). Traced graphs only."""
    if not tf.executing_eagerly():
        _graph_state(tensor.graph, "_brats_tf_recipes")[tensor.name] = recipe


def _recipe_of(tensor: tf.Tensor) -> "_Recipe | None":
    if tf.executing_eagerly() or not tf.is_symbolic_tensor(tensor):  # eager: no recipes
        return None
    return _graph_state(tensor.graph, "_brats_tf_recipes").get(tensor.name)


def _recomputed_block(inputs, k1, b1, g1, be1, k2, b2, g2, be2, groups, epsilon,
                      recipe: "_Recipe | None" = None):
    """The block (input + residual branch), keeping only its input for the
    backward pass.

    Same values and gradients as autodiff of ``ResNetBlock._residual``
    (tests/test_model.py, tests/test_layers.py), but the backward pass is
    written by hand so that it holds as few full-size tensors as it can: it
    recomputes GN1 + ReLU twice (for conv1, then for conv1's kernel gradient)
    instead of keeping it, keeps only a boolean mask of the second ReLU, and
    orders each gradient right after what it needs. The backward pass of one
    block holds about 4 activations (0.5 GB each at the paper crop's full
    resolution): its input, the incoming gradient and two working tensors;
    ``tf.recompute_grad`` of the same function held about 7 (the recomputed
    forward's activations stay alive until autodiff's backward has used
    them; tests/test_layers.py::test_recompute_keeps_one_activation_per_block).
    The conv2 output is never recomputed: no gradient needs it. The identity
    shortcut's gradient is added inside, in place. Float32 GN statistics
    (``_gn_statistics``) and the layers' compute dtype as everywhere else.

    With a ``recipe`` for the input (``_Recipe``: the stem, InitConv and
    InitDropout, before the first encoder block; an upsampling, and for the
    decoder its sum with the skip features, before a VAE or decoder block),
    the block keeps the recipe's inputs instead (the image and the stem's
    weights and dropout mask; the half-resolution tensor and the skip
    features), makes its input again at the start of its backward pass, and
    returns the gradients of the recipe's inputs, not of its own input: one
    full-resolution tensor fewer from the forward pass to that point.
    """
    dtype = inputs.dtype
    extra = recipe.inputs if recipe is not None else []

    def norm_relu(*args):  # XLA-fused here only when asked for (fused_elementwise)
        return _norm_relu_fused(*args, recompute=True)

    @tf.custom_gradient
    def block(x, k1, b1, g1, be1, k2, b2, g2, be2, *extra):
        mean1, rstd1, count1 = _gn_statistics(tf.cast(x, tf.float32), groups, epsilon)
        c1 = _conv_same(norm_relu(x, mean1, rstd1, g1, be1, dtype), k1, b1)
        mean2, rstd2, count2 = _gn_statistics(tf.cast(c1, tf.float32), groups, epsilon)
        out = x + _conv_same(norm_relu(c1, mean2, rstd2, g2, be2, dtype), k2, b2)

        def grad(dy):
            # Nothing is recomputed before the gradient arrives, nor before
            # the backward pass of the previous recomputed block is done.
            with tf.control_dependencies([dy] + _previous_backward(dy)):
                # The block's input from its recipe: the forward's x is then
                # not read here, so it is freed after the forward pass.
                x_ = recipe.make(*extra) if recipe is not None else x
                h1 = norm_relu(x_, mean1, rstd1, g1, be1, dtype)
            c1 = _conv_same(h1, k1, b1)  # h1 is dropped here, made again below
            h2 = norm_relu(c1, mean2, rstd2, g2, be2, dtype)
            dk2 = _conv_kernel_grad(h2, k2, dy, recompute=True)
            relu2 = h2 > 0  # 1 byte a voxel; h2 goes after dk2 and this
            db2 = tf.raw_ops.BiasAddGrad(out_backprop=dy)
            with tf.control_dependencies([dk2, relu2]):
                dh2 = _conv_input_grad(h2, k2, dy)
            dz2 = tf.where(relu2, dh2, tf.zeros((), dtype))
            dc1, dg2, dbe2 = _gn_backward(dz2, c1, mean2, rstd2, g2, count2, groups,
                                          recompute=True)
            db1 = tf.raw_ops.BiasAddGrad(out_backprop=dc1)
            with tf.control_dependencies([dc1]):
                h1 = norm_relu(x_, mean1, rstd1, g1, be1, dtype)
            dk1 = _conv_kernel_grad(h1, k1, dc1, recompute=True)
            relu1 = h1 > 0
            with tf.control_dependencies([dk1, relu1]):
                dh1 = _conv_input_grad(x_, k1, dc1)
            dz1 = tf.where(relu1, dh1, tf.zeros((), dtype))
            # The identity shortcut's gradient dy is added here, in place:
            # left to autodiff, dy and the branch's gradient stayed alive
            # side by side until an AddN ran, which the executor sometimes
            # put off past the next block's backward pass (2 activations).
            dx, dg1, dbe1 = _gn_backward(dz1, x_, mean1, rstd1, g1, count1, groups,
                                         d_residual=dy, recompute=True)
            grads = [dx, dk1, db1, dg1, dbe1, dk2, db2, dg2, dbe2]
            if recipe is not None:  # the input's gradient goes to the recipe's inputs
                grads = [None] + grads[1:] + list(recipe.grads(extra, dx))
            _record_backward(dy, [g for g in grads if g is not None])
            return grads

        return out, grad

    return block(inputs, k1, b1, g1, be1, k2, b2, g2, be2, *extra)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Conv3D(keras.layers.Conv3D):
    """``keras.layers.Conv3D`` whose kernel gradient, for a stride-1 'same'
    convolution with bias, is ``_conv_kernel_grad``'s.

    Same function, weights and gradients as Keras's layer (up to float32
    summation order; tests/test_conv_grad.py). In training, where
    ``_conv_kernel_grad`` uses one matrix product (on CPUs: oneDNN's kernel
    gradient of channels-last data is an im2col GEMM at less than half the
    speed of its forward pass there), the layer's backward pass is written
    out: input gradient and bias gradient by TensorFlow's ops, kernel
    gradient by ``conv_grad.conv3d_kernel_grad``. Elsewhere (GPUs, mixed
    precision, strided or 1x1x1 convolutions, inference) it is Keras's layer.
    """

    def _same_with_bias(self) -> bool:
        return (self.strides == (1, 1, 1) and self.padding == "same" and self.groups == 1
                and self.dilation_rate == (1, 1, 1) and self.use_bias
                and self.data_format == "channels_last"
                and self.activation is keras.activations.linear)

    def call(self, inputs, training=None):
        kernel = tf.cast(self.kernel, self.compute_dtype)
        if not (training and self._same_with_bias()
                and conv_grad.use_matmul(inputs, kernel.shape)):
            return super().call(inputs)

        @tf.custom_gradient
        def conv(x, kernel, bias):
            def grad(d_out):
                return (_conv_input_grad(x, kernel, d_out),
                        conv_grad.conv3d_kernel_grad(x, d_out),
                        tf.raw_ops.BiasAddGrad(out_backprop=d_out))

            return _conv_same(x, kernel, bias), grad

        return conv(inputs, kernel, tf.cast(self.bias, self.compute_dtype))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HeadConv3D(keras.layers.Conv3D):
    """A 1x1x1 'same' convolution (the output heads DecoderEnd_Conv1 and Vend
    under ``--recompute``) whose input gradient waits for its turn.

    Same function, weights and gradients as ``keras.layers.Conv3D``. In
    training, its backward pass computes the kernel and bias gradients as
    soon as the output gradient arrives, which frees the head's input (a
    full-resolution activation), but computes the input gradient (another
    one) only after the recomputed ResNet blocks traced before it
    (``_previous_backward``). Autodiff computes both at once: when the
    segmentation decoder's full-resolution blocks ran their backward pass,
    the VAE's head had already made its input gradient, which then waited,
    0.5 GB at the paper crop, for its own blocks (and the other way round).
    """

    def __init__(self, filters: int, kernel_size=1, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        if self.kernel_size != (1, 1, 1) or self.strides != (1, 1, 1):
            raise ValueError(f"HeadConv3D {self.name!r} is a 1x1x1 stride-1 convolution")

    def call(self, inputs, training=None):
        if not training:
            return super().call(inputs)

        @tf.custom_gradient
        def head(x, kernel, bias):
            def grad(d_out):
                d_kernel = _conv_kernel_grad(x, kernel, d_out)
                d_bias = tf.raw_ops.BiasAddGrad(out_backprop=d_out)
                with tf.control_dependencies([d_kernel] + _previous_backward(d_out)):
                    d_x = _conv_input_grad(x, kernel, d_out)
                return d_x, d_kernel, d_bias

            return _conv_same(x, kernel, bias), grad

        return head(inputs, tf.cast(self.kernel, self.compute_dtype),
                    tf.cast(self.bias, self.compute_dtype))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StemConv3D(Conv3D):
    """A stride-1 'same' convolution (InitConv under ``--recompute``) whose
    output a recomputed ResNet block can make again.

    Same function, weights and gradients as ``keras.layers.Conv3D``. In a
    traced training step it records a recipe for its output (the convolution
    of its input, 4 channels, by its kernel), which ``StemDropout3D`` extends
    and the first recomputed block uses: the stem's output, a 32-channel
    full-resolution tensor (0.5 GB at the paper crop), is then not kept from
    the forward pass to the end of the backward pass. Making it again costs
    one 4 -> 32 channel convolution, 0.3% of the step's FLOPs.
    """

    def __init__(self, filters: int, kernel_size=3, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        if self.strides != (1, 1, 1) or self.padding != "same" or self.groups != 1 \
                or self.dilation_rate != (1, 1, 1) or not self.use_bias \
                or self.activation is not keras.activations.linear:
            raise ValueError(f"StemConv3D {self.name!r} is a stride-1 'same' convolution "
                             "with bias and no activation")

    def call(self, inputs, training=None):
        if not training or tf.executing_eagerly():
            return super().call(inputs, training=training)
        kernel = tf.cast(self.kernel, self.compute_dtype)
        bias = tf.cast(self.bias, self.compute_dtype)
        outputs = _conv_same(inputs, kernel, bias)

        def grads(recipe_inputs, d):
            x, k, _ = recipe_inputs
            return (_conv_input_grad(x, k, d), _conv_kernel_grad(x, k, d),
                    tf.raw_ops.BiasAddGrad(out_backprop=d))

        _register_recipe(outputs, _Recipe([inputs, kernel, bias], _conv_same, grads))
        return outputs


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StemDropout3D(keras.layers.SpatialDropout3D):
    """``keras.layers.SpatialDropout3D`` (InitDropout under ``--recompute``)
    that passes on its input's recipe (``StemConv3D``).

    The same numbers as Keras' layer for the same seed (one stateless draw
    of the [B, 1, 1, 1, C] channel mask, scaled by 1 / (1 - rate);
    tests/test_layers.py). In a traced training step, if its input has a
    recipe, its output's recipe is that one times the mask, so the block
    after it can make it again; the mask is [B, C] numbers.
    """

    def call(self, inputs, training=False):
        if not (training and self.rate > 0):
            return inputs
        ones = tf.ones(self._get_noise_shape(inputs), inputs.dtype)
        mask = keras.random.dropout(ones, self.rate, seed=self.seed_generator)
        outputs = inputs * mask
        recipe = _recipe_of(inputs)
        if recipe is not None:
            n = len(recipe.inputs)

            def make(*args):
                return recipe.make(*args[:n]) * args[n]

            def grads(recipe_inputs, d):
                return list(recipe.grads(recipe_inputs[:n], d * recipe_inputs[n])) + [None]

            _register_recipe(outputs, _Recipe(recipe.inputs + [mask], make, grads))
        return outputs


def _identity_recipe(tensor: tf.Tensor) -> _Recipe:
    return _Recipe([tensor], lambda t: t, lambda inputs, d: [d])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SkipAdd(keras.layers.Add):
    """``keras.layers.Add`` (the decoder's additive skip, DecoderUp{level}_Add,
    under ``--recompute``) that passes on its inputs' recipes.

    Same values and gradients as Keras' Add. In a traced training step, if an
    input has a recipe (the upsampled decoder features, TrilinearUpSampling3D),
    the sum gets one: the recipes' inputs and the other addends (the skip
    features, which the encoder keeps anyway), so the recomputed block after
    it keeps no full-resolution tensor of its own.
    """

    def call(self, inputs):
        outputs = super().call(inputs)
        recipes = [_recipe_of(x) for x in inputs]
        if not any(r is not None for r in recipes):
            return outputs
        recipes = [r if r is not None else _identity_recipe(x) for r, x in zip(recipes, inputs)]
        bounds = [0]
        for r in recipes:
            bounds.append(bounds[-1] + len(r.inputs))

        def make(*args):
            parts = [r.make(*args[a:b]) for r, a, b in zip(recipes, bounds, bounds[1:])]
            total = parts[0]
            for part in parts[1:]:  # Keras' Add sums in this order
                total = total + part
            return total

        def grads(recipe_inputs, d):
            return [g for r, a, b in zip(recipes, bounds, bounds[1:])
                    for g in r.grads(recipe_inputs[a:b], d)]

        _register_recipe(outputs, _Recipe([t for r in recipes for t in r.inputs], make, grads))
        return outputs


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNetBlock(keras.layers.Layer):
    """The paper's ResNet-like block (§3.1, Table 1).

    GN, ReLU, Conv3x3x3, GN, ReLU, Conv3x3x3, then add the block's input
    (identity shortcut; input and output have the same channel count).

    GroupNorm computes its statistics in float32, so the block is safe under
    a mixed_float16 policy (see tests/test_layers.py).

    Args:
      filters: channels of the input and output.
      groups: GroupNormalization groups (the paper: 8).
      l2_weight: L2 weight on both convolution kernels (the paper: 1e-5).
      recompute: gradient checkpointing: in training, keep only the block's
        input for the backward pass and recompute the GN/ReLU/conv
        activations from it there (``_recomputed_block``, a hand-written
        backward pass that holds fewer full-size tensors than
        ``tf.recompute_grad`` would). Same values and gradients, about one
        more forward pass of the block, and far less memory: at the paper
        crop each full-resolution activation is 32 x 3.9M floats = 0.5 GB
        and a block keeps about four of them otherwise (benchmarks/
        model_step.py --recompute_levels). The block has no random ops, so
        recomputing is exact.

    Input/output: [B, D, H, W, filters].
    """

    def __init__(self, filters: int, groups: int = 8, l2_weight: float = 0.0,
                 recompute: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters = _check_positive_int("filters", filters)
        self.groups = _check_positive_int("groups", groups)
        if filters % groups:
            raise ValueError(
                f"ResNetBlock {self.name!r}: filters={filters} is not divisible by groups={groups}"
            )
        if l2_weight < 0:
            raise ValueError(f"l2_weight must be >= 0, got {l2_weight!r}")
        self.l2_weight = float(l2_weight)
        self.recompute = bool(recompute)
        self.norm1 = GroupNorm(groups, epsilon=1e-5, name="gn1")
        self.conv1 = conv3d(filters, 3, l2_weight=self.l2_weight, name="conv1")
        self.norm2 = GroupNorm(groups, epsilon=1e-5, name="gn2")
        self.conv2 = conv3d(filters, 3, l2_weight=self.l2_weight, name="conv2")

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels != self.filters:
            raise ValueError(
                f"ResNetBlock {self.name!r} has {self.filters} filters but its input has "
                f"{channels} channels; the identity shortcut needs them equal"
            )
        shape = tuple(input_shape)
        self.norm1.build(shape)
        self.conv1.build(shape)
        self.norm2.build(shape)
        self.conv2.build(shape)
        self.built = True

    def _residual(self, inputs):
        x = self.norm1(inputs)
        x = tf.nn.relu(x)
        x = self.conv1(x)
        x = self.norm2(x)
        x = tf.nn.relu(x)
        return self.conv2(x)

    def _weights(self, dtype):
        """The two convolutions' kernels and biases in ``dtype``, the two
        GroupNorms' gamma and beta in float32, in ``_recomputed_block``'s
        argument order."""
        f32 = tf.float32
        return (tf.cast(self.conv1.kernel, dtype), tf.cast(self.conv1.bias, dtype),
                tf.cast(self.norm1.gamma, f32), tf.cast(self.norm1.beta, f32),
                tf.cast(self.conv2.kernel, dtype), tf.cast(self.conv2.bias, dtype),
                tf.cast(self.norm2.gamma, f32), tf.cast(self.norm2.beta, f32))

    def call(self, inputs, training=None):
        if self.recompute and training:
            return _recomputed_block(inputs, *self._weights(inputs.dtype), self.groups,
                                     self.norm1.epsilon, recipe=_recipe_of(inputs))
        if training:
            return self._residual(inputs) + inputs
        return self._inference_residual(inputs) + inputs

    def _inference_residual(self, inputs):
        """``_residual`` outside training: GN + ReLU as one float32 expression
        (``GroupNorm.relu_of``) with no gradient bookkeeping; the same values."""
        x = self.conv1(self.norm1.relu_of(inputs))
        return self.conv2(self.norm2.relu_of(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, groups=self.groups, l2_weight=self.l2_weight,
                      recompute=self.recompute)
        return config


def _resize_bilinear(images: tf.Tensor, size) -> tf.Tensor:
    """``tf.image.resize(images, size, "bilinear")`` of float32 [N, H, W, C],
    whose gradient keeps only the input's shape, not the input.

    TensorFlow's gradient of the resize (``ResizeBilinearGrad``) reads the
    original image for its shape alone, but that keeps it alive from the
    forward pass to the backward one: in the trilinear upsampling, the
    half-upsampled intermediate (half a full-resolution activation) and the
    low-resolution input. Here zeros of that shape are made when the
    gradient runs, and freed right after.
    """

    @tf.custom_gradient
    def resize(x):
        shape, dtype = tf.shape(x), x.dtype

        def grad(dy):  # dy: float32, the resize's output type
            return _resize_bilinear_grad(dy, shape, dtype)

        return tf.image.resize(x, size, method="bilinear"), grad

    return resize(images)


def _resize_bilinear_grad(dy: tf.Tensor, shape, dtype) -> tf.Tensor:
    """Gradient of ``_resize_bilinear`` of an image of this shape and dtype,
    given the float32 gradient dy of its output (zeros stand in for the
    image: the op reads only its shape)."""
    return tf.raw_ops.ResizeBilinearGrad(
        grads=tf.cast(dy, tf.float32), original_image=tf.zeros(shape, dtype),
        align_corners=False, half_pixel_centers=True)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TrilinearUpSampling3D(keras.layers.Layer):
    """Trilinear upsampling of [B, D, H, W, C] by an integer factor per axis.

    The paper upsamples with trilinear interpolation (§3.1, "3D bilinear");
    Keras 3's UpSampling3D only repeats voxels (nearest neighbour). This layer
    is separable linear interpolation with half-pixel centres and edge
    clamping, the convention of tf.image.resize and of PyTorch's
    ``Upsample(mode='trilinear', align_corners=False)`` used by MONAI's
    SegResNet. Works for unknown (None) spatial sizes and any float dtype.

    In a traced training step it records a recipe for its output (``_Recipe``):
    a recomputed ResNet block that reads it (VBlock, or DecoderBlock through
    ``SkipAdd``) keeps the low-resolution input, 1/8 of the size, and
    upsamples again in its backward pass (~0.2 s at the paper crop's full
    resolution on 2 cores) instead of keeping the output.
    """

    def __init__(self, size=2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(size, int):
            size = (size, size, size)
        if not isinstance(size, (tuple, list)) or len(size) != 3:
            raise ValueError(f"size must be an int or 3 ints, got {size!r}")
        for s in size:
            _check_positive_int("size", s)
        self.size = tuple(size)

    def call(self, inputs, training=None):
        outputs = self._upsample(inputs)
        if training:  # a recomputed block after it can make the output again
            _register_recipe(outputs, _Recipe([inputs], self._upsample, self._upsample_grads))
        return outputs

    def _upsample_grads(self, inputs, d):
        """The gradient of ``_upsample`` (its ops in reverse), given the
        output's gradient d; reads only the input's shape. Autodiff of a
        second ``_upsample`` would also run that upsampling (a reshape's
        gradient reads its input's shape), at whatever time the executor
        chose: an extra full-resolution tensor at the recompute peak."""
        x = inputs[0]
        fd, fh, fw = self.size
        shape = tf.shape(x)
        b, depth, h, w = shape[0], shape[1], shape[2], shape[3]
        c = x.shape[-1] if x.shape[-1] is not None else shape[4]
        work = x.dtype if x.dtype in (tf.float32, tf.float64) else tf.float32
        resize_hw = fh > 1 or fw > 1
        if fd == 1 and not resize_hw:
            return [d]
        g = tf.cast(d, tf.float32)  # the resizes' output type
        if fd > 1:  # the depth resize's input: float32 after a first resize
            g = _resize_bilinear_grad(tf.reshape(g, [b, depth * fd, h * fh * w * fw, c]),
                                      [b, depth, h * fh * w * fw, c],
                                      tf.float32 if resize_hw else work)
        if resize_hw:
            g = _resize_bilinear_grad(tf.reshape(g, [b * depth, h * fh, w * fw, c]),
                                      [b * depth, h, w, c], work)
        return [tf.cast(tf.reshape(g, shape), x.dtype)]

    def _upsample(self, inputs):
        # Separable: tf.image.resize's bilinear kernel (half-pixel centres,
        # edge clamping) on H, W with D folded into the batch, then on D with
        # H, W folded into one image axis, which is resized by 1 (an exact
        # copy). At the paper's full-resolution upsampling (80x96x64x32 ->
        # 160x192x128x32, alone, 2 CPU cores) this takes 0.18 s forward and
        # 0.83 s forward + backward, against 0.52 s and 1.23 s for the
        # earlier per-axis shifted slices and blends.
        fd, fh, fw = self.size
        shape = tf.shape(inputs)
        b, d, h, w = shape[0], shape[1], shape[2], shape[3]
        c = inputs.shape[-1] if inputs.shape[-1] is not None else shape[4]
        # float16/bfloat16 (mixed precision) are resized in float32, which
        # the bilinear kernel computes in anyway: with a float16 image, XLA
        # (jit_compile) lowers the resize's gradient to a float32 tensor that
        # then meets float16 ones ("Seen floating point types of different
        # precisions ... mixed precision is disallowed"; test_layers.py).
        x = inputs if inputs.dtype in (tf.float32, tf.float64) else tf.cast(inputs, tf.float32)
        if fh > 1 or fw > 1:
            x = tf.reshape(x, [b * d, h, w, c])
            h, w = h * fh, w * fw
            x = tf.reshape(_resize_bilinear(x, [h, w]), [b, d, h, w, c])
        if fd > 1:
            x = tf.reshape(x, [b, d, h * w, c])
            d = d * fd
            x = tf.reshape(_resize_bilinear(x, [d, h * w]), [b, d, h, w, c])
        x = tf.cast(x, inputs.dtype)  # bilinear resize returns float32
        x.set_shape(self.compute_output_shape(tuple(inputs.shape)))
        return x

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for i, factor in zip((1, 2, 3), self.size):
            if shape[i] is not None:
                shape[i] = shape[i] * factor
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GaussianSampling(keras.layers.Layer):
    """VDraw (§3.2): splits VD's output and draws z ~ N(mean, std^2).

    The input [B, 2 * latent] is split into a mean half and a log-variance
    half, std = exp(0.5 * log_var), and z = mean + std * eps with
    eps ~ N(0, I) (reparameterisation). The paper's Table 1 calls the second
    half "std"; predicting log-variance is the same distribution family
    without a positivity constraint or log(0) in the KL term (deviation
    documented in WORKSPACE.md).

    Always samples (training and inference): the VAE branch exists only in
    the training model. Computed in float32 (its dtype policy is forced).

    Input: [B, 2 * latent]. Outputs: (z, mean, log_var), each [B, latent], float32.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if input_shape[-1] is None or input_shape[-1] % 2:
            raise ValueError(
                f"{self.name}: the input's last size must be even (mean and log-variance "
                f"halves), got {input_shape[-1]}"
            )
        self.built = True

    def call(self, inputs):
        params = tf.cast(inputs, tf.float32)
        mean, log_var = tf.split(params, 2, axis=-1)
        eps = keras.random.normal(tf.shape(mean), seed=self.seed_generator)
        z = mean + tf.exp(0.5 * log_var) * eps
        return z, mean, log_var

    def compute_output_shape(self, input_shape):
        half = tuple(input_shape[:-1]) + (input_shape[-1] // 2,)
        return half, half, half

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SpatialDivisibilityCheck(keras.layers.Layer):
    """Identity that fails with a clear message when D, H or W is not divisible.

    The encoder downsamples three times by 2 and the decoder adds the skip
    connections back, so every spatial size must be divisible by 8 (PAPER.md
    "Network"). Checked statically when the size is known and at run time
    (tf.debugging) when it is not.
    """

    def __init__(self, divisor: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.divisor = _check_positive_int("divisor", divisor)

    def build(self, input_shape):
        check_spatial_shape(input_shape[1:4], self.divisor)
        self.built = True

    def call(self, inputs):
        spatial = tf.shape(inputs)[1:4]
        tf.debugging.assert_equal(
            spatial % self.divisor,
            tf.zeros_like(spatial),
            message=(
                f"every spatial size of the [B, D, H, W, C] input must be divisible by "
                f"{self.divisor}; pad the volume (e.g. 240x240x155 -> 240x240x160) and crop "
                f"the prediction back"
            ),
        )
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(divisor=self.divisor)
        return config


def check_spatial_shape(spatial_shape, divisor: int) -> None:
    """Raises ValueError naming the shape when a known size is not divisible."""
    known = [s for s in spatial_shape if s is not None]
    if any(int(s) <= 0 for s in known):
        raise ValueError(f"spatial sizes must be positive, got {tuple(spatial_shape)}")
    bad = [int(s) for s in known if int(s) % divisor]
    if bad:
        shape = "x".join("?" if s is None else str(int(s)) for s in spatial_shape)
        padded = "x".join(
            "?" if s is None else str(-(-int(s) // divisor) * divisor) for s in spatial_shape
        )
        raise ValueError(
            f"spatial size {shape} is not divisible by {divisor} (sizes {bad}); "
            f"pad to {padded} and crop the prediction back"
        )
