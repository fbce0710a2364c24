"""The graph (TF) versions of ``data_pipeline.volume``'s functions, for [B, D, H, W, C]
tensors of any (dynamic) spatial size: padding to a multiple of 8 and cropping
back (§3.1), the brain's bounding box, and the per-channel normalisation over
non-zero voxels (§3.7). They run in ``predict_volume``'s graph and in the
SavedModel, and are tested against the NumPy versions, which define the
conventions:

* Padding: zeros, split symmetrically, the odd voxel at the END
  (before = total // 2, after = total - before; 155 -> 160 pads 2 before and 3
  after). Zero is the background value after ``normalize_nonzero_tf``.
  ``mode="end"`` pads only at the end.
"""

from __future__ import annotations

import tensorflow as tf

from data_pipeline import constants, volume


# ----------------------------------------------------------------- padding
def pad_to_multiple_tf(
    x: tf.Tensor, multiple: int = constants.SPATIAL_DIVISOR, mode: str = "symmetric"
):
    """Pads [B, D, H, W, C] of any (dynamic) size so that D, H and W are multiples of
    ``multiple`` (§3: sizes divisible by 8); ``mode`` "symmetric" splits the padding
    around the volume (the odd voxel after), "end" puts it after.

    Returns (padded, pads) with pads an int32 [3, 2] tensor for ``crop_back_tf``.
    ``padded`` keeps ``x``'s static batch and channel sizes: Keras 3 runs a
    convolution whose input has no static channel count through XLA
    (``keras.src.backend.tensorflow.nn.conv``, its grouped-convolution check),
    which is slow on a CPU and compiles anew for every new box size
    (docs/history/performance.md, "Inference in one graph").
    """
    multiple = volume.check_multiple(multiple)
    volume.check_pad_mode(mode)
    spatial = tf.shape(x)[1:4]
    total = tf.math.floormod(-spatial, multiple)
    before = total // 2 if mode == "symmetric" else tf.zeros_like(total)
    pads = tf.stack([before, total - before], axis=1)  # [3, 2]
    zero = tf.zeros((1, 2), tf.int32)
    padded = tf.pad(x, tf.concat([zero, pads, zero], axis=0))
    return _static_batch_and_channels(padded, x), pads


def crop_back_tf(x: tf.Tensor, pads: tf.Tensor) -> tf.Tensor:
    """Undoes ``pad_to_multiple_tf``: ``x`` [B, D, H, W, C] (or [B, D, H, W]) without ``pads``."""
    shape = tf.shape(x)
    rank = tf.rank(x)
    begin = tf.concat([[0], pads[:, 0], tf.zeros([rank - 4], tf.int32)], axis=0)
    size = tf.concat([[-1], shape[1:4] - pads[:, 0] - pads[:, 1], tf.fill([rank - 4], -1)], axis=0)
    return _static_batch_and_channels(tf.slice(x, begin, size), x)


def _static_batch_and_channels(out: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """``out`` (a spatial crop or pad of ``x``) with ``x``'s static batch and
    channel sizes, which tf.slice with -1 sizes and tf.pad lose."""
    if x.shape.rank is not None:
        out.set_shape(x.shape[:1].concatenate([None] * 3).concatenate(x.shape[4:]))
    return out


# ------------------------------------------------------------ brain box
def brain_box_tf(
    x: tf.Tensor, multiple: int = constants.SPATIAL_DIVISOR, margin: int = 0
) -> tuple[tf.Tensor, tf.Tensor]:
    """Graph version of ``volume.brain_box`` for [B, D, H, W, C]: one box for the batch
    (the union of the cases' boxes). Returns (start, size), int32 [3] each."""
    multiple = volume.check_multiple(multiple)
    mask = tf.reduce_any(tf.not_equal(x, 0), axis=[0, 4])  # [D, H, W]
    spatial = tf.shape(mask)
    starts, sizes = [], []
    for axis in range(3):
        n = spatial[axis]
        others = [a for a in range(3) if a != axis]
        hits = tf.cast(tf.where(tf.reduce_any(mask, axis=others))[:, 0], tf.int32)
        found = tf.size(hits) > 0
        lo = tf.where(found, tf.maximum(tf.reduce_min(tf.concat([hits, [n]], 0)) - margin, 0), 0)
        hi = tf.where(
            found, tf.minimum(tf.reduce_max(tf.concat([hits, [-1]], 0)) + 1 + margin, n), n
        )
        want = tf.minimum((hi - lo + multiple - 1) // multiple * multiple, n)
        starts.append(tf.clip_by_value(lo - (want - (hi - lo)) // 2, 0, n - want))
        sizes.append(want)
    return tf.stack(starts), tf.stack(sizes)


def crop_box_tf(x: tf.Tensor, start: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """x[:, start:start + size, :] for [B, D, H, W, C]."""
    out = tf.slice(x, tf.concat([[0], start, [0]], 0), tf.concat([[-1], size, [-1]], 0))
    return _static_batch_and_channels(out, x)


def paste_box_tf(x: tf.Tensor, start: tf.Tensor, full_spatial: tf.Tensor) -> tf.Tensor:
    """Inverse of ``crop_box_tf``: zero-pads [B, d, h, w, C] back to [B, D, H, W, C]."""
    after = full_spatial - start - tf.shape(x)[1:4]
    pads = tf.concat(
        [tf.zeros((1, 2), tf.int32), tf.stack([start, after], axis=1), tf.zeros((1, 2), tf.int32)],
        axis=0,
    )
    return _static_batch_and_channels(tf.pad(x, pads), x)


# ----------------------------------------------------------- normalisation
def normalize_nonzero_tf(image: tf.Tensor) -> tf.Tensor:
    """Graph version of ``volume.normalize_nonzero`` for [B, D, H, W, C]; float32 out.

    The statistics are accumulated in float64: a float32 sum over the ~3.5 M
    brain voxels of a BraTS channel drifts (docs/history/performance.md, "Inference in
    one graph"); float64 keeps them within 1e-6 of NumPy. Two passes (mean,
    then mean squared deviation); ``divide_no_nan`` and a std of 1 where it
    is 0, so an all-zero or constant channel gives no NaN.
    """
    x = tf.cast(image, tf.float64)
    axes = (1, 2, 3)
    mask = tf.not_equal(x, 0.0)
    maskf = tf.cast(mask, tf.float64)
    count = tf.reduce_sum(maskf, axis=axes, keepdims=True)
    mean = tf.math.divide_no_nan(tf.reduce_sum(x, axis=axes, keepdims=True), count)
    centred = (x - mean) * maskf
    var = tf.math.divide_no_nan(tf.reduce_sum(tf.square(centred), axis=axes, keepdims=True), count)
    std = tf.sqrt(var)
    std = tf.where(std > 0.0, std, tf.ones_like(std))
    return tf.cast(centred / std, tf.float32)
