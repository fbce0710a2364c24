"""The paper's layers (§3.1-3.2, Fig. 1, Table 1) in standard Keras / TensorFlow ops.

Tensor layout everywhere: [B, D, H, W, C] (channels last). Every layer here is
serialisable (complete ``get_config``) and registered under the ``brats_tf``
package name, so ``.keras`` files load without ``custom_objects``. Gradients
come from TensorFlow's autodiff; nothing here depends on the device, the CPU
or environment variables.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from data_pipeline.checks import positive_int

_PACKAGE = "brats_tf"


def conv3d(
    filters: int,
    kernel_size: int = 3,
    strides: int = 1,
    l2_weight: float = 0.0,
    name: str | None = None,
    dtype=None,
    layer_class=keras.layers.Conv3D,
    kernel_initializer="glorot_uniform",
    bias_initializer="zeros",
) -> keras.layers.Conv3D:
    """The paper's convolution: 'same' padding, bias, L2 on the kernel (§3.5).

    ``kernel_size=1`` is the paper's "Conv1". Kernels start Glorot-uniform,
    TensorFlow's default (the paper names no initialiser); He-normal makes the
    un-normalised residual sums blow the initial logits up (std ~15-20 at
    init against ~2.5; docs/deviations.md). ``layer_class``: a subclass of
    Keras' Conv3D (``brats_tf.recompute``'s, under ``--recompute``);
    ``kernel_initializer``/``bias_initializer``: Keras initialisers (the
    segmentation head's options, ``ModelConfig.head_kernel_init``).
    """
    regularizer = keras.regularizers.L2(l2_weight) if l2_weight else None
    return layer_class(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer=kernel_initializer,
        bias_initializer=bias_initializer,
        kernel_regularizer=regularizer,
        name=name,
        dtype=dtype,
    )


def channel_sums(x):
    """[B, D, H, W, C] -> [B, 1, 1, 1, C]: sums over H and W, then over D;
    short float32 sums (~2e-7 relative at the paper's full resolution, where
    one sum over all 3.9 M voxels errs by ~1e-5)."""
    return tf.reduce_sum(tf.reduce_sum(x, axis=[2, 3], keepdims=True), axis=1, keepdims=True)


def group_average(per_channel, groups: int):
    """[B, 1, 1, 1, C] -> the mean over each channel's group of channels."""
    channels = per_channel.shape[-1]
    grouped = tf.reshape(per_channel, [-1, groups, channels // groups])
    means = tf.reduce_mean(grouped, axis=-1, keepdims=True)
    return tf.reshape(tf.broadcast_to(means, tf.shape(grouped)), [-1, 1, 1, 1, channels])


def group_mean(x, groups: int):
    """[B, D, H, W, C] -> [B, 1, 1, 1, C]: each channel's group mean."""
    voxels = tf.cast(tf.reduce_prod(tf.shape(x)[1:4]), x.dtype)
    return group_average(channel_sums(x) / voxels, groups)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GroupNorm(keras.layers.Layer):
    """Group normalisation (Wu & He 2018) of [B, D, H, W, C], channels last.

    The function of ``keras.layers.GroupNormalization(groups, axis=-1)``: per
    example, the C channels form ``groups`` contiguous groups; each group is
    normalised over its voxels and channels, then scaled by a per-channel
    gamma and shifted by beta. Its statistics are ALWAYS float32 and two-pass
    (mean, then the mean of the squared centred values), also under a mixed
    precision policy, where float16 activations could overflow in a variance.
    The means are taken over H and W, then over D (``channel_sums``). The
    output is ``centred * scale + beta``, so autodiff's per-channel sums are
    of centred values (no cancellation for inputs far from 0). The output has
    the layer's compute dtype.
    """

    def __init__(self, groups: int = 8, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.groups = positive_int("groups", groups)
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
        x = tf.cast(inputs, tf.float32)
        centred = x - group_mean(x, self.groups)
        variance = group_mean(tf.square(centred), self.groups)
        scale = tf.math.rsqrt(variance + self.epsilon) * tf.cast(self.gamma, tf.float32)
        outputs = centred * scale + tf.cast(self.beta, tf.float32)
        return tf.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNetBlock(keras.layers.Layer):
    """The paper's ResNet-like block (§3.1, Table 1): GN, ReLU, Conv3x3x3,
    GN, ReLU, Conv3x3x3, plus the block's input (identity shortcut).

    Args:
      filters: channels of the input and the output.
      groups: GroupNorm groups (the paper: 8).
      l2_weight: L2 weight on both convolution kernels (the paper: 1e-5).

    ``brats_tf.recompute.RecomputedResNetBlock`` is the same block with
    gradient checkpointing (``train.py --recompute``).
    """

    recompute = False  # gradient checkpointing (brats_tf.recompute)

    def __init__(self, filters: int, groups: int = 8, l2_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters = positive_int("filters", filters)
        self.groups = positive_int("groups", groups)
        if filters % groups:
            raise ValueError(
                f"ResNetBlock {self.name!r}: filters={filters} is not divisible by groups={groups}"
            )
        if l2_weight < 0:
            raise ValueError(f"l2_weight must be >= 0, got {l2_weight!r}")
        self.l2_weight = float(l2_weight)
        self.norm1 = GroupNorm(groups, name="gn1")
        self.conv1 = conv3d(filters, 3, l2_weight=self.l2_weight, name="conv1")
        self.norm2 = GroupNorm(groups, name="gn2")
        self.conv2 = conv3d(filters, 3, l2_weight=self.l2_weight, name="conv2")

    def build(self, input_shape):
        if input_shape[-1] != self.filters:
            raise ValueError(
                f"ResNetBlock {self.name!r} has {self.filters} filters but its "
                f"input has {input_shape[-1]} channels; the identity shortcut "
                f"needs them equal"
            )
        for layer in (self.norm1, self.conv1, self.norm2, self.conv2):
            layer.build(tuple(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        x = self.conv1(tf.nn.relu(self.norm1(inputs)))
        x = self.conv2(tf.nn.relu(self.norm2(x)))
        return inputs + x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, groups=self.groups, l2_weight=self.l2_weight)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TrilinearUpSampling3D(keras.layers.Layer):
    """Trilinear upsampling of [B, D, H, W, C] by an integer factor per axis.

    The paper upsamples with trilinear interpolation (§3.1, "3D bilinear");
    Keras 3's UpSampling3D only repeats voxels (nearest neighbour). This layer
    is separable linear interpolation with half-pixel centres and edge
    clamping, the convention of ``tf.image.resize`` and of PyTorch's
    ``Upsample(mode='trilinear', align_corners=False)`` (MONAI's SegResNet):
    ``tf.image.resize``'s bilinear kernel on H, W with D folded into the
    batch, then on D with H, W folded into one image axis (resized by 1, an
    exact copy). Works for unknown (None) spatial sizes and any float dtype;
    16-bit inputs are resized in float32, which the kernel computes in
    anyway (a float16 image also trips XLA's mixed-precision check in the
    resize's gradient).
    """

    def __init__(self, size=2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(size, int):
            size = (size, size, size)
        if not isinstance(size, (tuple, list)) or len(size) != 3:
            raise ValueError(f"size must be an int or 3 ints, got {size!r}")
        for s in size:
            positive_int("size", s)
        self.size = tuple(size)

    def call(self, inputs):
        fd, fh, fw = self.size
        shape = tf.shape(inputs)
        b, d, h, w = shape[0], shape[1], shape[2], shape[3]
        c = inputs.shape[-1] if inputs.shape[-1] is not None else shape[4]
        x = inputs if inputs.dtype in (tf.float32, tf.float64) else tf.cast(inputs, tf.float32)
        if fh > 1 or fw > 1:
            h, w = h * fh, w * fw
            x = tf.image.resize(tf.reshape(x, [b * d, shape[2], shape[3], c]), [h, w])
            x = tf.reshape(x, [b, d, h, w, c])
        if fd > 1:
            d = d * fd
            x = tf.image.resize(tf.reshape(x, [b, shape[1], h * w, c]), [d, h * w])
            x = tf.reshape(x, [b, d, h, w, c])
        x = tf.cast(x, inputs.dtype)  # the bilinear resize returns float32
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
    documented in docs/deviations.md).

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
    connections back, so every spatial size must be divisible by 8 (§3.1).
    Checked statically when the size is known and at run time (tf.debugging)
    when it is not.
    """

    def __init__(self, divisor: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.divisor = positive_int("divisor", divisor)

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
