"""Reference versions the tests check the library against, used by tests only.

NumPy padding to a multiple of 8 and cropping back (the convention of
``data_pipeline.volume``; ``brats_tf.inference.pad_to_multiple_tf`` is its
graph version), the paper's augmentation ops one after another on whole
volumes (``data_pipeline.input.train_transform`` computes the same in one
fused step), and parsing a stored example into decoded volumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from data_pipeline import constants
from data_pipeline.augment import crop_window, flip_mask, intensity_params, random_crop_start
from data_pipeline.features import decode_volumes, parse_raw
from data_pipeline.volume import check_multiple, check_pad_mode


# ------------------------------------------------------- NumPy padding (volume.py's convention)
def _spatial_axes(ndim: int, spatial_axes) -> tuple[int, int, int]:
    if spatial_axes is None:
        if ndim in (3, 4):  # [D, H, W] or [D, H, W, C]
            return (0, 1, 2)
        if ndim == 5:  # [B, D, H, W, C]
            return (1, 2, 3)
        raise ValueError(
            f"expected a [D, H, W], [D, H, W, C] or [B, D, H, W, C] array, got {ndim} dims"
        )
    axes = tuple(int(a) for a in spatial_axes)
    if len(axes) != 3 or any(not 0 <= a < ndim for a in axes):
        raise ValueError(f"spatial_axes must be 3 axes of a {ndim}-d array, got {spatial_axes!r}")
    return axes


def padding_for(
    spatial_shape: Sequence[int], multiple: int = constants.SPATIAL_DIVISOR, mode: str = "symmetric"
) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial axis to reach a multiple of ``multiple``."""
    multiple = check_multiple(multiple)
    check_pad_mode(mode)
    pads = []
    for n in spatial_shape:
        if int(n) < 1:
            raise ValueError(f"spatial sizes must be positive, got {tuple(spatial_shape)}")
        total = -int(n) % multiple
        before = total // 2 if mode == "symmetric" else 0
        pads.append((before, total - before))
    return tuple(pads)


def pad_to_multiple(
    volume: np.ndarray,
    multiple: int = constants.SPATIAL_DIVISOR,
    mode: str = "symmetric",
    spatial_axes=None,
):
    """Zero-pads the spatial axes of ``volume`` up to multiples of ``multiple``.

    Args:
      volume: [D, H, W], [D, H, W, C] or [B, D, H, W, C] (or any array with
        ``spatial_axes`` given).
      multiple: 8 for this network (three stride-2 stages, §3.1).
      mode: "symmetric" (odd voxel at the end) or "end" (all padding at the end).
    Returns:
      (padded, pads): pads is ((before, after),) * 3, for ``crop_back``.
    """
    volume = np.asarray(volume)
    axes = _spatial_axes(volume.ndim, spatial_axes)
    pads = padding_for([volume.shape[a] for a in axes], multiple, mode)
    width = [(0, 0)] * volume.ndim
    for a, p in zip(axes, pads):
        width[a] = p
    return np.pad(volume, width), pads


def crop_back(padded: np.ndarray, pads, spatial_axes=None) -> np.ndarray:
    """Inverse of ``pad_to_multiple``: removes ``pads`` from the spatial axes (a view)."""
    padded = np.asarray(padded)
    axes = _spatial_axes(padded.ndim, spatial_axes)
    pads = tuple(tuple(int(v) for v in p) for p in pads)
    if len(pads) != 3 or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise ValueError(f"pads must be 3 (before, after) pairs >= 0, got {pads!r}")
    index = [slice(None)] * padded.ndim
    for a, (before, after) in zip(axes, pads):
        if before + after >= padded.shape[a]:
            raise ValueError(f"pads {pads} do not fit the array's shape {padded.shape}")
        index[a] = slice(before, padded.shape[a] - after)
    return padded[tuple(index)]


# ------------------------------------------- the augmentation ops, one after another (§3.7)
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
    piece = tf.slice(
        volume, tf.concat([begin, tf.zeros_like(rest)], 0), tf.concat([extent, rest], 0)
    )
    return pad_spatial(piece, paddings, size)


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


# ---------------------------------------------------------------- stored examples
def parse_example(serialized):
    """Parses and decodes one serialized example (graph-safe, for Dataset.map).

    Returns a dict: case_id string []; image float32 [d, h, w, 4] (exact for
    int16 data); label uint8 [d, h, w] (zeros when has_label is False);
    has_label bool []; box_start, box_shape, original_shape int32 [3];
    affine float64 [4, 4]; nonzero_mean, nonzero_std float32 [4].
    """
    ex = parse_raw(serialized)
    ex["image"], ex["label"] = decode_volumes(ex)
    del ex["image_dtype"]
    return ex
