"""Full-volume prediction (§3, §4): a model's probabilities, test-time
augmentation (the mean over the 8 mirror flips), ensembles (the mean over
models), and the whole volume's pipeline in TF ops (normalise, crop to the
brain's box, pad to a multiple of 8, predict, crop back, paste), shared by
``predict_volume`` and the SavedModel.

Layouts: a single case is [D, H, W, C] (C = 4 modalities in
``constants.MODALITIES`` order); a batch is [B, D, H, W, C]. Network outputs
are sigmoid PROBABILITIES (not logits), [.., 3] in ``constants.REGIONS``
order (WT, TC, ET).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from brats_tf.inference.volume_tf import (
    brain_box_tf,
    crop_back_tf,
    crop_box_tf,
    normalize_nonzero_tf,
    pad_to_multiple_tf,
    paste_box_tf,
)
from brats_tf.model import build_inference_model, config_from_model
from data_pipeline import constants, volume

FLIP_AXES = tuple(
    combo for r in range(4) for combo in itertools.combinations((1, 2, 3), r)
)  # the 8 mirror flips of [B, D, H, W, C]: (), (1,), ..., (1, 2, 3)


def model_probabilities(model, x: tf.Tensor) -> tf.Tensor:
    """Calls a model on [B, D, H, W, C]; returns its [B, D, H, W, 3] probabilities.

    A Keras model is called with ``training=False`` (no dropout); a dict output
    gives its ``"seg"`` entry. Cast to float32 (mixed precision).
    """
    out = model(x, training=False) if isinstance(model, keras.Model) else model(x)
    if isinstance(out, dict):
        if "seg" not in out:
            raise ValueError(f"model output dict has no 'seg' key: {sorted(out)}")
        out = out["seg"]
    return tf.cast(out, tf.float32)


def predict_tta_tf(model: Callable, x: tf.Tensor, tta: bool = False) -> tf.Tensor:
    """Probabilities of ``model`` on [B, D, H, W, C] (sizes already divisible by 8).

    With ``tta`` the mean of the sigmoid outputs over the 8 axis-flip
    combinations (flip the input, predict, flip the output back) (§4).
    """
    if not tta:
        return model_probabilities(model, x)
    total = None
    for axes in FLIP_AXES:
        xf = tf.reverse(x, axis=list(axes)) if axes else x
        y = model_probabilities(model, xf)
        y = tf.reverse(y, axis=list(axes)) if axes else y
        total = y if total is None else total + y
    return total / float(len(FLIP_AXES))


def _flip_if(x: tf.Tensor, flip: tf.Tensor, axis: int) -> tf.Tensor:
    return tf.cond(flip, lambda: tf.reverse(x, axis=[axis]), lambda: x)


def predict_tta_loop_tf(model: Callable, x: tf.Tensor) -> tf.Tensor:
    """``predict_tta_tf(model, x, tta=True)`` as a ``tf.while_loop`` over the 8 flips.

    For graphs (the SavedModel): the network appears once in the graph, the
    flips run one after another, so peak memory is that of one prediction
    (independent unrolled calls may run concurrently) and the graph is small.
    Flip i mirrors axis 1 if bit 0 of i is set, axis 2 for bit 1, axis 3 for bit 2.
    """
    out_shape = tf.concat([tf.shape(x)[:4], [constants.NUM_REGIONS]], axis=0)

    def flip(t, i):
        for bit, axis in enumerate((1, 2, 3)):
            t = _flip_if(t, tf.equal(tf.bitwise.bitwise_and(i, 1 << bit), 1 << bit), axis)
        return t

    def body(i, total):
        y = model_probabilities(model, flip(x, i))
        return i + 1, total + flip(y, i)

    _, total = tf.while_loop(
        lambda i, _: i < len(FLIP_AXES),
        body,
        (tf.constant(0), tf.zeros(out_shape, tf.float32)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None] * 4 + [None])),
        parallel_iterations=1,  # else up to 10 flips' activations are alive at once
    )
    return total / float(len(FLIP_AXES))


def as_inference_model(model):
    """A Keras training model (fixed crop, VAE) becomes its any-size inference model.

    Models without a fixed input shape (``build_inference_model``'s) and plain
    callables are returned unchanged.
    """
    if _is_brats_network(model):
        fixed = any(s is not None for s in model.inputs[0].shape[1:4])
        if fixed or any(layer.name == "Vend" for layer in model.layers):
            return build_inference_model(model)
    return model


def _is_brats_network(model) -> bool:
    """A Keras model built by ``brats_tf.model`` (or loaded from its .keras file)."""
    return isinstance(model, keras.Model) and any(x.name == "InitConv" for x in model.layers)


def padding_multiple(models) -> int:
    """What a volume is zero-padded to a multiple of before ``models`` run:
    the paper's 8 (``constants.SPATIAL_DIVISOR``, what Table 1's four levels
    need), or more for a network of more levels (2^(levels - 1)); over an
    ensemble, the least common multiple. predict_volume (so evaluate.py and
    validation) and the SavedModel pad so, and predict alike. A callable that
    is not a brats_tf network: 8."""
    divisors = [constants.SPATIAL_DIVISOR]
    for model in models:
        if _is_brats_network(model):
            divisors.append(config_from_model(model).spatial_divisor)
    return math.lcm(*divisors)


_GRAPH_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def volume_probabilities_tf(
    predict: Callable,
    x: tf.Tensor,
    normalize: bool = True,
    crop_to_brain: bool = True,
    multiple: int = constants.SPATIAL_DIVISOR,
    pad_mode: str = "symmetric",
    margin: int = 0,
) -> tf.Tensor:
    """``predict_volume``'s whole pipeline in TF ops, for [B, D, H, W, C] raw cases.

    Normalise (``normalize_nonzero_tf``), crop to the brain's box
    (``brain_box_tf``; one box for the batch), pad to ``multiple``, ``predict``
    (a callable [B, d, h, w, C] -> [B, d, h, w, 3] probabilities), crop the
    padding back, paste the box into a zero volume. Returns float32
    [B, D, H, W, 3]. The SavedModel's signatures and ``predict_volume`` share it.
    """
    x, placement = prepare_volume_tf(x, normalize, crop_to_brain, multiple, pad_mode, margin)
    return place_back_tf(predict(x), placement)


def prepare_volume_tf(
    x: tf.Tensor,
    normalize: bool = True,
    crop_to_brain: bool = True,
    multiple: int = constants.SPATIAL_DIVISOR,
    pad_mode: str = "symmetric",
    margin: int = 0,
):
    """``volume_probabilities_tf`` before the network: raw [B, D, H, W, C] ->
    (the network's input, its placement for ``place_back_tf``)."""
    full = tf.shape(x)[1:4]
    x = normalize_nonzero_tf(x) if normalize else tf.cast(x, tf.float32)
    start = None
    if crop_to_brain:
        start, size = brain_box_tf(x, multiple, margin)
        x = crop_box_tf(x, start, size)
    x, pads = pad_to_multiple_tf(x, multiple, pad_mode)
    return x, (pads, start, full)


def place_back_tf(probs: tf.Tensor, placement) -> tf.Tensor:
    """``volume_probabilities_tf`` after the network: crop the padding back and
    paste the box into a zero volume (``prepare_volume_tf``'s placement); float32."""
    pads, start, full = placement
    probs = crop_back_tf(tf.cast(probs, tf.float32), pads)
    return probs if start is None else paste_box_tf(probs, start, full)


def _volume_fn(model, tta: bool, channels: int, **options) -> Callable:
    """``volume_probabilities_tf`` for ``model`` (TTA-averaged with ``tta``): a
    tf.function for a Keras model, cached per (model, tta, options); other
    callables run it eagerly as they are.

    Run as a graph, each activation is freed as soon as its last consumer has
    run; a Keras functional model called eagerly keeps every layer's output
    until the call returns (at 240 x 240 x 160 x 32 one is 1.2 GB). The
    normalisation, box, padding and paste run in the graph too (on the GPU
    when there is one), not in NumPy on the host (docs/history/performance.md,
    "Inference in one graph"). TTA runs the flips in a ``tf.while_loop``
    (``predict_tta_loop_tf``). The input signature leaves the sizes unknown:
    cases of different sizes share one trace, and it avoids a TensorFlow 2.21
    bug: with static sizes, oneDNN's graph rewrite folds the constant
    ``tf.pad`` into the first 3x3x3 'same' convolution and drops that
    convolution's own padding (30 x 36 x 21 padded to 32 x 40 x 24 came out of
    the convolution as 30 x 38 x 22; ``tests/test_inference.py``).
    """
    if not isinstance(model, keras.Model):
        return lambda x: volume_probabilities_tf(
            lambda t: predict_tta_tf(model, t, tta=tta), x, **options
        )
    fns = _GRAPH_FNS.setdefault(model, {})
    key = (tta, channels) + tuple(sorted(options.items()))
    if key not in fns:
        ref = weakref.ref(model)  # the cache must not keep the model alive
        # with TTA the 8 flips one after another: the memory of one prediction
        network = predict_tta_loop_tf if tta else model_probabilities

        def predict(t):
            return network(ref(), t)

        spec = tf.TensorSpec([None, None, None, None, channels], tf.float32)
        fns[key] = tf.function(
            lambda x: volume_probabilities_tf(predict, x, **options), input_signature=[spec]
        )
    return fns[key]


def predict_volume(
    models,
    image: np.ndarray,
    tta: bool = False,
    normalize: bool = True,
    multiple: int | None = None,
    pad_mode: str = "symmetric",
    crop_to_brain: bool = True,
    margin: int = 0,
) -> np.ndarray:
    """Full-volume segmentation probabilities of one case (§3.7, "Network", §4).

    Normalises (``volume.normalize_nonzero``'s statistics, in TF float64; pass
    ``normalize=False`` for an image that is already normalised), crops to
    the brain's box (``volume.brain_box``; ``crop_to_brain=False`` runs the whole
    volume as the paper does), zero-pads to a multiple of ``multiple`` (None:
    ``padding_multiple(models)``, 8 for the paper's network), predicts, crops
    back; voxels outside the box get probability 0. ``tta``: mean over the 8
    mirror flips. ``models`` a list: ensemble, the mean of the models'
    (TTA-averaged) probabilities. All of it runs in TF
    (``volume_probabilities_tf``), as one graph per Keras model.

    Args:
      models: a Keras model from ``build_model``/``build_inference_model`` (a
        training model is converted with ``as_inference_model``), any callable
        [B, D, H, W, C] -> [B, D, H, W, 3] or {"seg": ...}, or a list of them.
      image: [D, H, W, C] raw intensities, C in ``constants.MODALITIES`` order.
      margin: voxels of background kept around the brain's bounding box.
    Returns: [D, H, W, 3] float32 probabilities (channels ``constants.REGIONS``).
    """
    if not isinstance(models, (list, tuple)):
        models = [models]
    if not models:
        raise ValueError("models is empty: give at least one model")
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"image must be one case [D, H, W, C], got shape {image.shape}")
    models = [as_inference_model(m) for m in models]
    multiple = volume.check_multiple(padding_multiple(models) if multiple is None else multiple)
    volume.check_pad_mode(pad_mode, "pad_mode")
    margin = volume.check_margin(margin)
    if normalize:
        volume.check_raw_image(image)  # the statistics are float64 in the graph
    batch = tf.convert_to_tensor(image[None].astype(np.float32, copy=False))
    options = dict(
        normalize=bool(normalize),
        crop_to_brain=bool(crop_to_brain),
        multiple=multiple,
        pad_mode=pad_mode,
        margin=margin,
    )
    total = None
    for model in models:  # inference models held here: the cache only refers to them weakly
        y = _volume_fn(model, tta, image.shape[-1], **options)(batch).numpy()[0]
        total = y if total is None else total + y
    return np.ascontiguousarray(total / len(models), dtype=np.float32)
