"""Gradient checkpointing of the ResNet blocks (``train.py --recompute``), by hand.

Not in the paper (its V100 had 32 GB): the model built with
``ModelConfig.recompute_levels > 0`` uses the classes below in the finest
levels instead of the plain layers of ``brats_tf.layers``. They compute the
same values, and the same gradients up to float rounding
(tests/test_recompute.py), but in training the ResNet blocks keep only what
they are made from and compute their activations again in the backward pass.

Why by hand and not ``tf.recompute_grad`` on each block: at the paper crop
``tf.recompute_grad`` held about twice the memory of this module
(docs/history/performance.md, "The plain core"). What makes the difference:

* the block's backward pass (``_recomputed_block``) holds about 4
  full-resolution tensors (its input, the incoming gradient, two working
  tensors) where autodiff of the recomputed forward holds about 7;
* a block whose input is cheap to make again keeps what the input is made
  from (``_Recipe``): the stem's output (``StemConv3D``, ``StemDropout3D``)
  from the image and the dropout mask, an upsampled input
  (``RecomputedUpSampling3D``, ``SkipAdd``) from the half-resolution tensor
  and the skip features: no full-resolution block input is kept;
* the blocks' backward passes run one after the other in the order autodiff
  builds them (``_previous_backward``), and the output heads
  (``HeadConv3D``) make their input gradients in turn, so the decoder's and
  the VAE's full-resolution working sets are never alive at once.

The bookkeeping (recipes, the last backward pass) lives in the traced
graph's collections (``_graph_state``). The ops and their gradients, the
textbook ones, are ``brats_tf.block_ops``: GroupNorm's from per-channel sums
of centred values (no cancellation), the convolutions' by TensorFlow's ops.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from brats_tf import layers as L
from brats_tf.block_ops import (
    conv_input_grad,
    conv_kernel_grad,
    conv_same,
    gn_backward,
    gn_statistics,
    norm_relu,
)

_PACKAGE = "brats_tf"


# ---------------------------------------------------------- graph state
def _graph_state(graph, name: str) -> dict:
    """A dict kept in a traced graph (one of its collections): it lives and
    goes with the graph."""
    collection = graph.get_collection_ref(name)
    if not collection:
        collection.append({})
    return collection[0]


def _previous_backward(dy: tf.Tensor) -> list:
    """The outputs of the last recomputed backward pass traced into this
    graph on this device, or [] (eager, or the first). Each recomputed
    block's backward pass waits for them, so the passes run one after the
    other in the order autodiff makes them: without this the executor ran
    the decoder's and the VAE's full-resolution blocks side by side
    (docs/history/performance.md). The order cannot make a cycle: a pass traced
    earlier was built before this one's outputs existed. Per device, so that
    replicas are not serialised."""
    if tf.executing_eagerly():
        return []
    return _graph_state(dy.graph, "_brats_tf_last_backward").get(dy.device, [])


def _record_backward(dy: tf.Tensor, grads) -> None:
    if not tf.executing_eagerly():
        _graph_state(dy.graph, "_brats_tf_last_backward")[dy.device] = list(grads)


class _Recipe:
    """How to make a tensor again in the backward pass from smaller tensors,
    and how to pass its gradient on to them: ``inputs`` (kept for the
    backward pass), ``make(*inputs)`` (the tensor again), ``grads(inputs,
    d)`` (the inputs' gradients given the tensor's, None where there is
    none, e.g. a random mask)."""

    def __init__(self, inputs, make, grads):
        self.inputs, self.make, self.grads = list(inputs), make, grads


def _register_recipe(tensor: tf.Tensor, recipe: _Recipe) -> None:
    if not tf.executing_eagerly():
        _graph_state(tensor.graph, "_brats_tf_recipes")[tensor.name] = recipe


def _recipe_of(tensor: tf.Tensor) -> _Recipe | None:
    if tf.executing_eagerly() or not tf.is_symbolic_tensor(tensor):
        return None
    return _graph_state(tensor.graph, "_brats_tf_recipes").get(tensor.name)


# ------------------------------------------------------------- the block
def _recomputed_block(
    inputs, k1, b1, g1, be1, k2, b2, g2, be2, groups, epsilon, recipe: _Recipe | None = None
):
    """The block (input + residual branch), keeping only its input, or with
    a ``recipe`` for the input only the recipe's inputs, for the backward
    pass. The backward pass recomputes GN1 + ReLU twice (for conv1, then for
    conv1's kernel gradient) instead of keeping it, keeps a boolean mask of
    the second ReLU, orders each gradient right after what it needs, adds
    the shortcut's gradient inside, and never recomputes conv2's output (no
    gradient needs it)."""
    dtype = inputs.dtype
    extra = recipe.inputs if recipe is not None else []

    @tf.custom_gradient
    def block(x, k1, b1, g1, be1, k2, b2, g2, be2, *extra):
        mean1, rstd1 = gn_statistics(tf.cast(x, tf.float32), groups, epsilon)
        c1 = conv_same(norm_relu(x, mean1, rstd1, g1, be1, dtype), k1, b1)
        mean2, rstd2 = gn_statistics(tf.cast(c1, tf.float32), groups, epsilon)
        out = x + conv_same(norm_relu(c1, mean2, rstd2, g2, be2, dtype), k2, b2)

        def grad(dy):
            # Nothing is recomputed before the gradient arrives, nor before
            # the previous recomputed backward pass is done.
            with tf.control_dependencies([dy] + _previous_backward(dy)):
                x_ = recipe.make(*extra) if recipe is not None else x
                h1 = norm_relu(x_, mean1, rstd1, g1, be1, dtype)
            c1 = conv_same(h1, k1, b1)  # h1 is dropped here, made again below
            h2 = norm_relu(c1, mean2, rstd2, g2, be2, dtype)
            dk2 = conv_kernel_grad(h2, k2, dy)
            relu2 = h2 > 0  # 1 byte a voxel; h2 goes after dk2 and this
            db2 = tf.raw_ops.BiasAddGrad(out_backprop=dy)
            with tf.control_dependencies([dk2, relu2]):
                dh2 = conv_input_grad(h2, k2, dy)
            dz2 = tf.where(relu2, dh2, tf.zeros((), dtype))
            dc1, dg2, dbe2 = gn_backward(dz2, c1, mean2, rstd2, g2, groups)
            db1 = tf.raw_ops.BiasAddGrad(out_backprop=dc1)
            with tf.control_dependencies([dc1]):
                h1 = norm_relu(x_, mean1, rstd1, g1, be1, dtype)
            dk1 = conv_kernel_grad(h1, k1, dc1)
            relu1 = h1 > 0
            with tf.control_dependencies([dk1, relu1]):
                dh1 = conv_input_grad(x_, k1, dc1)
            dz1 = tf.where(relu1, dh1, tf.zeros((), dtype))
            dx, dg1, dbe1 = gn_backward(dz1, x_, mean1, rstd1, g1, groups, d_residual=dy)
            grads = [dx, dk1, db1, dg1, dbe1, dk2, db2, dg2, dbe2]
            if recipe is not None:  # the input's gradient goes to the recipe's inputs
                grads = [None] + grads[1:] + list(recipe.grads(extra, dx))
            _record_backward(dy, [g for g in grads if g is not None])
            return grads

        return out, grad

    return block(inputs, k1, b1, g1, be1, k2, b2, g2, be2, *extra)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RecomputedResNetBlock(L.ResNetBlock):
    """``layers.ResNetBlock`` that, in training, keeps only its input (or its
    input's recipe) and recomputes its activations in the backward pass."""

    recompute = True

    def call(self, inputs, training=None):
        if not training:
            return super().call(inputs)
        f32, dtype = tf.float32, inputs.dtype
        weights = (
            tf.cast(self.conv1.kernel, dtype),
            tf.cast(self.conv1.bias, dtype),
            tf.cast(self.norm1.gamma, f32),
            tf.cast(self.norm1.beta, f32),
            tf.cast(self.conv2.kernel, dtype),
            tf.cast(self.conv2.bias, dtype),
            tf.cast(self.norm2.gamma, f32),
            tf.cast(self.norm2.beta, f32),
        )
        return _recomputed_block(
            inputs, *weights, self.groups, self.norm1.epsilon, recipe=_recipe_of(inputs)
        )


# ------------------------------------------------ layers that give recipes
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
    a full-resolution tensor, for its own blocks (and the other way round).
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
                d_kernel = conv_kernel_grad(x, kernel, d_out)
                d_bias = tf.raw_ops.BiasAddGrad(out_backprop=d_out)
                with tf.control_dependencies([d_kernel] + _previous_backward(d_out)):
                    d_x = conv_input_grad(x, kernel, d_out)
                return d_x, d_kernel, d_bias

            return conv_same(x, kernel, bias), grad

        return head(
            inputs, tf.cast(self.kernel, self.compute_dtype), tf.cast(self.bias, self.compute_dtype)
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StemConv3D(keras.layers.Conv3D):
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
        if (
            self.strides != (1, 1, 1)
            or self.padding != "same"
            or self.groups != 1
            or self.dilation_rate != (1, 1, 1)
            or not self.use_bias
            or self.activation is not keras.activations.linear
        ):
            raise ValueError(
                f"StemConv3D {self.name!r} is a stride-1 'same' convolution "
                "with bias and no activation"
            )

    def call(self, inputs, training=None):
        if not training or tf.executing_eagerly():
            return super().call(inputs)
        kernel = tf.cast(self.kernel, self.compute_dtype)
        bias = tf.cast(self.bias, self.compute_dtype)
        outputs = conv_same(inputs, kernel, bias)

        def grads(recipe_inputs, d):
            x, k, _ = recipe_inputs
            return (
                conv_input_grad(x, k, d),
                conv_kernel_grad(x, k, d),
                tf.raw_ops.BiasAddGrad(out_backprop=d),
            )

        _register_recipe(outputs, _Recipe([inputs, kernel, bias], conv_same, grads))
        return outputs


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StemDropout3D(keras.layers.SpatialDropout3D):
    """``keras.layers.SpatialDropout3D`` (InitDropout under ``--recompute``)
    that passes on its input's recipe (``StemConv3D``).

    The same numbers as Keras' layer for the same seed (one stateless draw
    of the [B, 1, 1, 1, C] channel mask, scaled by 1 / (1 - rate);
    tests/test_recompute.py). In a traced training step, if its input has a
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
    input has a recipe (the upsampled decoder features, RecomputedUpSampling3D),
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
            return [
                g
                for r, a, b in zip(recipes, bounds, bounds[1:])
                for g in r.grads(recipe_inputs[a:b], d)
            ]

        _register_recipe(outputs, _Recipe([t for r in recipes for t in r.inputs], make, grads))
        return outputs


def _resize_bilinear_grad(dy, shape, dtype):
    """Gradient of a bilinear ``tf.image.resize`` of an image of this shape
    and dtype, given the float32 gradient of its output (zeros stand in for
    the image: the op reads only its shape)."""
    return tf.raw_ops.ResizeBilinearGrad(
        grads=tf.cast(dy, tf.float32),
        original_image=tf.zeros(shape, dtype),
        align_corners=False,
        half_pixel_centers=True,
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RecomputedUpSampling3D(L.TrilinearUpSampling3D):
    """``layers.TrilinearUpSampling3D`` whose output a recomputed block after
    it (VBlock, or DecoderBlock through ``SkipAdd``) can make again from the
    input, 1/8 of the size (docs/history/performance.md), instead of keeping it."""

    def call(self, inputs, training=None):
        outputs = super().call(inputs)
        if training:
            _register_recipe(outputs, _Recipe([inputs], super().call, self._upsample_grads))
        return outputs

    def _upsample_grads(self, inputs, d):
        """The gradient of the upsampling (its ops in reverse) given the
        output's gradient d; reads only the input's shape (autodiff of the
        upsampling made again would run it again, an extra full-resolution
        tensor at the peak)."""
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
            g = _resize_bilinear_grad(
                tf.reshape(g, [b, depth * fd, h * fh * w * fw, c]),
                [b, depth, h * fh * w * fw, c],
                tf.float32 if resize_hw else work,
            )
        if resize_hw:
            g = _resize_bilinear_grad(
                tf.reshape(g, [b * depth, h * fh, w * fw, c]), [b * depth, h, w, c], work
            )
        return [tf.cast(tf.reshape(g, shape), x.dtype)]
