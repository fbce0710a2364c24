"""Counts the floating-point operations of the network, for benchmarks.

Counted: every convolution and dense layer, as 2 FLOPs per multiply-add,
plus their bias additions. Not counted: normalisation, activations,
upsampling and additions (memory-bound, < 2% of the total here). A training
step is counted as 3x the forward pass (forward, gradient w.r.t. activations,
gradient w.r.t. weights: each costs one forward's multiply-adds), the usual
convention (e.g. Kaplan et al. 2020, MLPerf).
"""

from __future__ import annotations

import math

import keras

from brats_tf.layers import ResNetBlock


def _conv_flops(layer: keras.layers.Conv3D, out_shape) -> int:
    k = math.prod(layer.kernel_size)
    cin = layer.kernel.shape[-2]
    voxels = math.prod(out_shape[1:4])
    return voxels * layer.filters * (2 * k * cin + 1)


def forward_flops(model: keras.Model) -> int:
    """FLOPs of one forward pass of ONE example through ``model``.

    The model's spatial input size must be known (a training model, or an
    inference model built for a fixed size).
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv3D):
            total += _conv_flops(layer, layer.output.shape)
        elif isinstance(layer, ResNetBlock):
            shape = layer.output.shape
            total += _conv_flops(layer.conv1, shape) + _conv_flops(layer.conv2, shape)
        elif isinstance(layer, keras.layers.Dense):
            n_in, n_out = layer.kernel.shape
            total += n_out * (2 * n_in + 1)
    return total


def train_step_flops(model: keras.Model, batch_size: int = 1) -> int:
    """FLOPs of one training step (forward + backward) on ``batch_size`` examples."""
    return 3 * forward_flops(model) * batch_size
