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


def pad_spatial(volume, paddings, size):
    """Zero-pads the first three axes of [d, h, w, ...] by paddings [3, 2] to `size`."""
    rest = tf.shape(volume)[3:]
    paddings = tf.concat([paddings, tf.zeros([tf.size(rest), 2], tf.int32)], axis=0)
    return tf.ensure_shape(tf.pad(volume, paddings), list(size) + volume.shape[3:].as_list())


def crop_or_pad(volume, start, size):
    """volume[start : start + size] on the first three axes, with zeros where the
    window leaves the volume (start may be negative or run past the end).

    Args:
      volume: [D, H, W, ...] tensor.
      start: int32 [3]; size: 3 Python ints (the output's static size).
    """
    volume = tf.convert_to_tensor(volume)
    begin, extent, paddings = crop_window(start, size, tf.shape(volume)[:3])
    rest = tf.shape(volume)[3:]
    piece = tf.slice(volume, tf.concat([begin, tf.zeros_like(rest)], 0),
                     tf.concat([extent, rest], 0))
    return pad_spatial(piece, paddings, size)


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


def random_crop_or_pad(image, label, crop_shape, seed, full_shape=None, box_start=None):
    """Random crop_shape window of image and label (same window), padded with zeros
    where the volume is smaller.

    When the volume is a crop of a larger zero-background grid (the converter
    stores the brain's bounding box), pass that grid's `full_shape` and the
    crop's `box_start`: the window is then drawn in the full grid, exactly as a
    crop of the full volume would be, without materialising it.

    Args:
      image: [D, H, W, C]; label: [D, H, W] or None.
      crop_shape: 3 Python ints.
      seed: int [2].
    Returns:
      (image [*crop_shape, C], label [*crop_shape] or None).
    """
    image = tf.convert_to_tensor(image)
    if full_shape is None:
        full_shape = tf.shape(image)[:3]
    start = random_crop_start(full_shape, crop_shape, seed)
    if box_start is not None:
        start = start - tf.cast(box_start, tf.int32)
    image = crop_or_pad(image, start, crop_shape)
    if label is not None:
        label = crop_or_pad(label, start, crop_shape)
    return image, label


def flip_mask(seed, probability=0.5):
    """Whether to mirror each spatial axis 0, 1, 2 (bool [3]), independently with
    `probability`."""
    return tf.random.stateless_uniform([3], seed) < probability


def flip_axes(seed, probability=0.5):
    """The spatial axes to mirror (int32 [n] among 0, 1, 2), as flip_mask."""
    return tf.boolean_mask(tf.range(3), flip_mask(seed, probability))


def random_flip(image, label, seed, probability=0.5):
    """Mirror image and label along each spatial axis (0, 1, 2) independently
    with `probability`. label may be None."""
    axes = flip_axes(seed, probability)
    image = tf.reverse(image, axes)
    if label is not None:
        label = tf.reverse(label, axes)
    return image, label


def intensity_params(seed, channels, shift=0.1, scale=(0.9, 1.1)):
    """Per channel (scale s ~ U(scale), shift o ~ U(-shift, shift)), float32 [channels] each."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    s = tf.random.stateless_uniform([channels], seeds[0], minval=scale[0], maxval=scale[1])
    o = tf.random.stateless_uniform([channels], seeds[1], minval=-shift, maxval=shift)
    return s, o


def random_intensity(image, seed, shift=0.1, scale=(0.9, 1.1), std=1.0):
    """Per channel image * s + o * std on the non-zero voxels, s ~ U(scale),
    o ~ U(-shift, shift) (paper §3.7; std is the channel's std, 1 after
    the normalisation). Zero voxels (background, padding) stay zero, as they
    are at inference.

    Args:
      image: [..., C] float32 with static C.
      seed: int [2].
    """
    image = tf.convert_to_tensor(image, tf.float32)
    s, o = intensity_params(seed, image.shape[-1], shift, scale)
    return tf.where(tf.not_equal(image, 0.0), image * s + o * tf.cast(std, tf.float32), 0.0)


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
