"""The ResNet block's ops written out, and their gradients, for the
hand-written backward pass of ``brats_tf.recompute``: a stride-1 'same'
convolution (Keras Conv3D's ops) with its kernel and input gradients
(TensorFlow's ops), GroupNorm's statistics and GroupNorm + ReLU from them
(GroupNorm's ops), and GroupNorm's textbook gradient from centred sums.
"""

import tensorflow as tf

from brats_tf import layers as L

_STRIDES_1 = [1, 1, 1, 1, 1]


def conv_same(x, kernel, bias):
    """A stride-1 'same' convolution with bias (Keras Conv3D's ops)."""
    return tf.nn.bias_add(tf.nn.conv3d(x, kernel, _STRIDES_1, "SAME"), bias)


def conv_kernel_grad(x, kernel, dy):
    return tf.raw_ops.Conv3DBackpropFilterV2(
        input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=_STRIDES_1, padding="SAME"
    )


def conv_input_grad(x, kernel, dy):
    """Input gradient of a stride-1 'same' convolution of x (reads x's shape only)."""
    return tf.raw_ops.Conv3DBackpropInputV2(
        input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=_STRIDES_1, padding="SAME"
    )


def gn_statistics(x, groups: int, epsilon: float):
    """Group mean and 1/std of float32 x, each [B, 1, 1, 1, C]: GroupNorm's."""
    mean = L.group_mean(x, groups)
    return mean, tf.math.rsqrt(L.group_mean(tf.square(x - mean), groups) + epsilon)


def norm_relu(x, mean, rstd, gamma, beta, dtype):
    """ReLU(GroupNorm(x)) from its statistics, GroupNorm's ops, in dtype."""
    x = tf.cast(x, tf.float32)
    return tf.nn.relu(tf.cast((x - mean) * (rstd * gamma) + beta, dtype))


def gn_backward(d_outputs, inputs, mean, rstd, gamma, groups: int, d_residual=None):
    """Gradients of y = GroupNorm(inputs) (gamma, beta) given dy:

        dx = rstd (dxhat - <dxhat> - xhat <dxhat xhat>),  dxhat = dy gamma,

    <.> a group's mean, from per-channel sums of dy and of dy (x - mean):
    centred, so no sum cancels. ``d_residual`` (optional) is added to dx:
    a residual connection's gradient. Returns (dx in the inputs' dtype, or
    d_residual's, d_gamma, d_beta)."""
    dy = tf.cast(d_outputs, tf.float32)
    # Only after dy: else the executor may make the copy long before.
    with tf.control_dependencies([dy]):
        centred = tf.cast(inputs, tf.float32) - mean
    voxels = tf.cast(tf.reduce_prod(tf.shape(dy)[1:4]), tf.float32)
    sum_dy, sum_dy_centred = L.channel_sums(dy), L.channel_sums(dy * centred)
    mean_dxhat = L.group_average(sum_dy * gamma / voxels, groups)
    mean_dxhat_xhat = L.group_average(sum_dy_centred * gamma / voxels, groups) * rstd
    d_inputs = dy * (rstd * gamma) - rstd * mean_dxhat - centred * (rstd * rstd * mean_dxhat_xhat)
    if d_residual is None:
        d_inputs = tf.cast(d_inputs, inputs.dtype)
    else:
        d_inputs = tf.cast(d_inputs, d_residual.dtype) + d_residual
    return (
        d_inputs,
        tf.reduce_sum(sum_dy_centred * rstd, axis=[0, 1, 2, 3]),
        tf.reduce_sum(sum_dy, axis=[0, 1, 2, 3]),
    )
