"""Pre-processing and augmentation ops of the paper (§3.7), pure TensorFlow.

The per-channel normalisation over non-zero voxels is not here: the
converter stores each case's statistics (``data_pipeline.volume.nonzero_stats``)
and the input pipeline applies them (``data_pipeline.input``); whole volumes
at inference are normalised in the SavedModel's graph
(``brats_tf.inference.normalize_nonzero_tf``).

Layout: image [D, H, W, C] float32, label [D, H, W] integer label map (values
data_pipeline.constants.LABEL_VALUES). Random ops take an explicit `seed`, an int32
or int64 tensor of shape [2], and use only stateless random ops, so the same
seed gives the same result, eagerly or inside Dataset.map (never Python or
NumPy randomness, which Dataset.map would freeze at trace time).
"""

import tensorflow as tf

from data_pipeline.volume import region_labels


def crop_window(start, size, dims):
    """The part of the window [start, start + size) that lies in a grid of `dims`.

    Returns (begin, extent, paddings): the window is the grid's
    [begin, begin + extent) padded by paddings [3, 2] (before, after) zeros.
    All int32 [3] tensors (paddings [3, 2]); size is 3 Python ints.
    """
    start = tf.cast(start, tf.int32)
    dims = tf.cast(dims, tf.int32)
    size_t = tf.constant(size, tf.int32)
    lo = tf.clip_by_value(start, 0, dims)
    hi = tf.maximum(tf.clip_by_value(start + size_t, 0, dims), lo)
    # A window that misses the grid entirely gives an empty piece, all padding.
    before = tf.clip_by_value(lo - start, 0, size_t)
    after = size_t - before - (hi - lo)
    return lo, hi - lo, tf.stack([before, after], axis=1)


def random_crop_start(full_shape, crop_shape, seed):
    """A uniform random window start in a grid of `full_shape`: in
    [0, full - crop] where the grid is larger than the crop, and in
    [full - crop, 0] (the grid placed at a random position inside the crop,
    i.e. padded) where it is smaller. int32 [3]."""
    full = tf.cast(full_shape, tf.int32)
    crop = tf.constant(crop_shape, tf.int32)
    lo = tf.minimum(0, full - crop)
    hi = tf.maximum(0, full - crop)
    u = tf.random.stateless_uniform([3], seed, dtype=tf.float32)
    start = lo + tf.cast(tf.floor(u * tf.cast(hi - lo + 1, tf.float32)), tf.int32)
    return tf.minimum(start, hi)


def flip_mask(seed, probability=0.5):
    """Whether to mirror each spatial axis 0, 1, 2 (bool [3]), independently with
    `probability`."""
    return tf.random.stateless_uniform([3], seed) < probability


def intensity_params(seed, channels, shift=0.1, scale=(0.9, 1.1)):
    """Per channel (scale s ~ U(scale), shift o ~ U(-shift, shift)), float32 [channels] each."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    s = tf.random.stateless_uniform([channels], seeds[0], minval=scale[0], maxval=scale[1])
    o = tf.random.stateless_uniform([channels], seeds[1], minval=-shift, maxval=shift)
    return s, o


def labels_to_regions(label):
    """Label map [...] -> float32 [..., 3] of 0/1: the nested regions in
    data_pipeline.constants.REGIONS order (WT, TC, ET). Graph version of
    ``data_pipeline.volume.labels_to_regions`` (ET = 4, the stored value; other
    values are in no region, unchecked)."""
    label = tf.cast(label, tf.int32)
    channels = []
    for values in region_labels():
        inside = tf.zeros_like(label, tf.bool)
        for value in values:
            inside = tf.logical_or(inside, tf.equal(label, value))
        channels.append(inside)
    return tf.cast(tf.stack(channels, axis=-1), tf.float32)
