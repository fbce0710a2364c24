"""Reusable layers of the network (paper §3, Fig. 1, Table 1).

Tensor layout everywhere: [B, D, H, W, C] (channels last). Every layer here is
serialisable (complete ``get_config``) and registered under the ``brats_tf``
package name, so ``.keras`` files load without ``custom_objects``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

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
) -> keras.layers.Conv3D:
    """The paper's convolution: 'same' padding, bias, L2 on the kernel (§3.5).

    ``kernel_size=1`` is the paper's "Conv1". Kernels start Glorot-uniform,
    TensorFlow's default (the paper names no initialiser); He-normal makes the
    un-normalised residual sums blow the initial logits up (std ~15-20 at
    init vs ~2.5, measured with tests/test_model.py's tiny model).
    """
    regularizer = keras.regularizers.L2(l2_weight) if l2_weight else None
    return keras.layers.Conv3D(
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
    """Sum of [B, D, H, W, C] over D, H, W, one axis at a time: [B, C].

    A single float32 reduce_sum over the ~10^7 voxels of a full-size volume
    accumulates rounding error (relative 2e-5 on a 240x240x160x8 tensor); three
    short sums are 170x more accurate (1e-7) for about one more memory pass.
    """
    return tf.reduce_sum(tf.reduce_sum(tf.reduce_sum(x, axis=1), axis=1), axis=1)


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

    def call(self, inputs):
        channels = inputs.shape[-1]
        per_group = channels // self.groups
        groups, epsilon, compute_dtype = self.groups, self.epsilon, self.compute_dtype

        def group_mean(per_channel_sum, count):  # [B, C] -> [B, 1, 1, 1, C] group means
            sums = tf.reduce_sum(tf.reshape(per_channel_sum, (-1, groups, per_group)), -1)
            means = tf.repeat(sums / count, per_group, axis=-1)
            return means[:, None, None, None, :]

        @tf.custom_gradient
        def group_norm(inputs, gamma, beta):
            x = tf.cast(inputs, tf.float32)
            count = tf.cast(tf.reduce_prod(tf.shape(x)[1:4]) * per_group, tf.float32)
            mean = group_mean(_spatial_sum(x), count)
            var = group_mean(_spatial_sum(tf.math.squared_difference(x, mean)), count)
            rstd = tf.math.rsqrt(var + epsilon)
            scale = rstd * gamma
            outputs = tf.cast(x * scale + (beta - mean * scale), compute_dtype)

            def grad(d_outputs):
                # y = xhat * gamma + beta, xhat = (x - mean) * rstd per group;
                # dx = rstd * (dxhat - <dxhat> - xhat * <dxhat * xhat>), <.> the
                # group mean, dxhat = dy * gamma. Written as dy * scale + xc * a + b
                # with per-channel a, b: two passes over the 5-D tensors (the
                # per-channel sums, then dx) and two full-size temporaries,
                # where autodiff of the forward keeps about five.
                dy = tf.cast(d_outputs, tf.float32)
                # xc needs only forward values: without the dependency on dy
                # the executor may make it long before this layer's gradient
                # arrives (at the recompute peak, two layers' xc were alive).
                with tf.control_dependencies([dy]):
                    xc = tf.cast(inputs, tf.float32) - mean
                sum_dy = _spatial_sum(dy)  # [B, C]
                sum_dy_xc = _spatial_sum(dy * xc)  # [B, C]
                rstd_c = rstd[:, 0, 0, 0, :]
                d_gamma = tf.reduce_sum(rstd_c * sum_dy_xc, 0)
                d_beta = tf.reduce_sum(sum_dy, 0)
                mean_dxhat = group_mean(gamma * sum_dy, count)
                mean_dxhat_xhat = group_mean(gamma * rstd_c * sum_dy_xc, count)
                a = -rstd * rstd * mean_dxhat_xhat
                b = -rstd * mean_dxhat
                # After the sums, dy and xc have no other reader, so the two
                # products below can reuse their buffers (TensorFlow forwards
                # an input whose only reference is the op); without the
                # dependency the executor may run dy * scale first.
                with tf.control_dependencies([sum_dy, sum_dy_xc]):
                    d_inputs = tf.cast(dy * scale + (xc * a + b), inputs.dtype)
                return d_inputs, d_gamma, d_beta

            return outputs, grad

        return group_norm(inputs, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups, epsilon=self.epsilon)
        return config


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
      recompute: gradient checkpointing (``tf.recompute_grad``): in training,
        keep only the block's input for the backward pass and recompute the
        GN/ReLU/conv activations from it there. Same values and gradients,
        about one more forward pass of the block, and far less memory: at the
        paper crop each full-resolution activation is 32 x 3.9M floats = 0.5 GB
        and a block keeps about six of them (benchmarks/model_step.py
        --recompute). The block has no random ops, so recomputing is exact.

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

    def call(self, inputs, training=None):
        if self.recompute and training:
            residual = tf.recompute_grad(self._residual)(inputs)
        else:
            residual = self._residual(inputs)
        return residual + inputs

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
            return tf.raw_ops.ResizeBilinearGrad(
                grads=dy, original_image=tf.zeros(shape, dtype),
                align_corners=False, half_pixel_centers=True)

        return tf.image.resize(x, size, method="bilinear"), grad

    return resize(images)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TrilinearUpSampling3D(keras.layers.Layer):
    """Trilinear upsampling of [B, D, H, W, C] by an integer factor per axis.

    The paper upsamples with trilinear interpolation (§3.1, "3D bilinear");
    Keras 3's UpSampling3D only repeats voxels (nearest neighbour). This layer
    is separable linear interpolation with half-pixel centres and edge
    clamping, the convention of tf.image.resize and of PyTorch's
    ``Upsample(mode='trilinear', align_corners=False)`` used by MONAI's
    SegResNet. Works for unknown (None) spatial sizes and any float dtype.
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

    def call(self, inputs):
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
