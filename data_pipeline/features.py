"""THE TFRecord feature spec: one tf.train.Example per case, written by the
converter and read by the input pipeline and evaluation (nothing else defines it).

Each example holds the case cropped to the bounding box of its non-zero voxels
(all modalities and the label), which is lossless because BraTS volumes are
skull-stripped (zero outside the brain), plus what puts arrays back into the
original NIfTI grid (``data_pipeline.volume.paste_crop``). Shards are
GZIP-compressed TFRecord files (``data_pipeline.record_format``: the
version, compression and file suffix, without TensorFlow).

Fields (shapes are those of the parsed tensors):
  spec_version     int64                    FEATURE_SPEC_VERSION (readers refuse others)
  case_id          bytes                    e.g. b"Brats18_2013_2_1"
  image            bytes, byte planes       uint8 [k, d, h, w, 4]: plane k = byte k
                                            (little-endian) of each value of the
                                            [d, h, w, 4] image, channels last in
                                            data_pipeline.constants.MODALITIES order
                                            (t1, t1ce, t2, flair); k = 2 for int16,
                                            4 for float32 (to_byte_planes)
  image_dtype      bytes                    b"int16" (when every voxel is an integer
                                            in int16 range, as in BraTS) else b"float32"
  box_shape        int64 [3]                d, h, w of the stored crop
  box_start        int64 [3]                offset of the crop in the original grid
  original_shape   int64 [3]                the NIfTI array shape, e.g. 240, 240, 155
  affine           bytes, float64 [4, 4]    the NIfTI affine (voxel -> RAS mm), exact
  has_label        int64                    1 when a label map is stored
  label            bytes, uint8 [d, h, w]   values data_pipeline.constants.LABEL_VALUES
                                            (2023 label 3 already mapped to 4); empty
                                            when has_label is 0
  nonzero_mean     float [4]                per channel mean over non-zero voxels
  nonzero_std      float [4]                per channel std over non-zero voxels
                                            (paper §3.7 normalisation statistics,
                                            computed in float64 by the converter:
                                            data_pipeline.volume.nonzero_stats)
"""

import numpy as np
import tensorflow as tf

from data_pipeline.constants import NUM_MODALITIES
from data_pipeline.record_format import FEATURE_SPEC_VERSION, IMAGE_DTYPES
from data_pipeline.volume import nonzero_stats

FEATURES = {
    # Absent from version 1 examples (interleaved image bytes): parse_raw refuses them.
    "spec_version": tf.io.FixedLenFeature([], tf.int64, default_value=1),
    "case_id": tf.io.FixedLenFeature([], tf.string),
    "image": tf.io.FixedLenFeature([], tf.string),
    "image_dtype": tf.io.FixedLenFeature([], tf.string),
    "box_shape": tf.io.FixedLenFeature([3], tf.int64),
    "box_start": tf.io.FixedLenFeature([3], tf.int64),
    "original_shape": tf.io.FixedLenFeature([3], tf.int64),
    "affine": tf.io.FixedLenFeature([], tf.string),
    "has_label": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.string),
    "nonzero_mean": tf.io.FixedLenFeature([NUM_MODALITIES], tf.float32),
    "nonzero_std": tf.io.FixedLenFeature([NUM_MODALITIES], tf.float32),
}


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def to_byte_planes(image):
    """[..., C] int16/float32 -> uint8 [itemsize, ..., C]: plane k holds byte k
    (little-endian) of every value. Deflate compresses these ~20% smaller and
    inflates them ~30% faster than interleaved bytes (the high bytes of MRI
    intensities are nearly constant)."""
    little = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))
    as_bytes = little.view(np.uint8).reshape(image.shape + (image.dtype.itemsize,))
    return np.ascontiguousarray(np.moveaxis(as_bytes, -1, 0))


def from_byte_planes(planes, dtype):
    """Inverse of to_byte_planes in TF: uint8 [k, ..., C] -> float32 [..., C] of
    the values stored as `dtype` (tf.int16 or tf.float32; exact). Shifts and ors
    of the planes (elementwise: fuses under XLA, and cheaper than a transpose
    without it), then a same-size bitcast."""
    unsigned = {2: tf.uint16, 4: tf.uint32}[dtype.size]
    word = tf.cast(planes[0], unsigned)
    for k in range(1, dtype.size):
        word = tf.bitwise.bitwise_or(
            word, tf.bitwise.left_shift(tf.cast(planes[k], unsigned), tf.constant(8 * k, unsigned))
        )
    return tf.cast(tf.bitcast(word, dtype), tf.float32)


def serialize_example(case_id, image, label, original_shape, affine, box_start):
    """One case as a serialized tf.train.Example.

    Args:
      case_id: str.
      image: [d, h, w, 4] int16 or float32, channels in MODALITIES order.
      label: [d, h, w] uint8 or None.
      original_shape, box_start: 3 ints; affine: [4, 4].
    """
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[-1] != NUM_MODALITIES:
        raise ValueError(
            f"case {case_id}: image shape {image.shape} is not [d, h, w, {NUM_MODALITIES}]"
        )
    if image.dtype.name not in IMAGE_DTYPES:
        raise ValueError(f"case {case_id}: image dtype {image.dtype} not in {IMAGE_DTYPES}")
    if label is not None and (label.shape != image.shape[:3] or label.dtype != np.uint8):
        raise ValueError(
            f"case {case_id}: label {label.shape} {label.dtype} does not match "
            f"image {image.shape[:3]} uint8"
        )
    mean, std = nonzero_stats(image)
    with np.errstate(over="ignore"):
        finite = all(np.isfinite(np.asarray(v, np.float32)).all() for v in (mean, std))
    if not finite:
        raise ValueError(
            f"case {case_id}: non-finite intensity statistics (mean {mean}, "
            f"std {std}): intensities too large for float32"
        )
    feature = {
        "spec_version": _ints([FEATURE_SPEC_VERSION]),
        "case_id": _bytes(case_id.encode()),
        "image": _bytes(to_byte_planes(image).tobytes()),
        "image_dtype": _bytes(image.dtype.name.encode()),
        "box_shape": _ints(image.shape[:3]),
        "box_start": _ints(box_start),
        "original_shape": _ints(original_shape),
        "affine": _bytes(np.asarray(affine, dtype="<f8").reshape(4, 4).tobytes()),
        "has_label": _ints([label is not None]),
        "label": _bytes(b"" if label is None else np.ascontiguousarray(label).tobytes()),
        "nonzero_mean": _floats(mean),
        "nonzero_std": _floats(std),
    }
    # deterministic: the map's fields in key order. Otherwise their order (and
    # the shard bytes) can change from one process to the next.
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def parse_raw(serialized):
    """Parses one serialized example without decoding the volumes (graph-safe).

    Returns the `FEATURES` dict with image and label still bytes, and
    box_shape, box_start, original_shape as int32; pass it to decode_volumes.
    """
    ex = tf.io.parse_single_example(serialized, FEATURES)
    ok = tf.debugging.assert_equal(
        ex["spec_version"],
        tf.constant(FEATURE_SPEC_VERSION, tf.int64),
        message=f"example of another feature spec version than {FEATURE_SPEC_VERSION} "
        "(written by another converter version): reconvert the NIfTI files",
    )
    with tf.control_dependencies([ok]):
        ex["image"] = tf.identity(ex["image"])
    for key in ("box_shape", "box_start", "original_shape"):
        ex[key] = tf.cast(ex[key], tf.int32)
    ex["has_label"] = tf.equal(ex["has_label"], 1)
    ex["affine"] = tf.reshape(
        tf.io.decode_raw(ex["affine"], tf.float64, little_endian=True), [4, 4]
    )
    return ex


def _window_args(ex, begin, size, paddings):
    if begin is None:
        begin, size = tf.zeros([3], tf.int32), ex["box_shape"]
    if paddings is None:
        paddings = tf.zeros([3, 2], tf.int32)
    return begin, size, paddings


def image_planes(ex, dtype, begin=None, size=None, paddings=None):
    """The stored image's byte planes, uint8 [itemsize of dtype, d, h, w, 4], for
    an example whose image_dtype is `dtype` (tf.int16 or tf.float32); optionally
    only the window [begin, begin + size) of the box (int32 [3] each, inside the
    box), zero-padded by paddings (int32 [3, 2], before and after per axis).
    from_byte_planes turns them into values."""
    begin, size, paddings = _window_args(ex, begin, size, paddings)
    k = dtype.size
    planes = tf.reshape(
        tf.io.decode_raw(ex["image"], tf.uint8),
        tf.concat([[k], ex["box_shape"], [NUM_MODALITIES]], 0),
    )
    planes = tf.slice(
        planes, tf.concat([[0], begin, [0]], 0), tf.concat([[k], size, [NUM_MODALITIES]], 0)
    )
    return tf.pad(planes, tf.concat([[[0, 0]], paddings, [[0, 0]]], 0))


def decode_label(ex, begin=None, size=None, paddings=None):
    """The label map, uint8 [d, h, w] (zeros when has_label is False), optionally
    windowed and padded as in image_planes."""
    begin, size, paddings = _window_args(ex, begin, size, paddings)

    def window():
        volume = tf.reshape(tf.io.decode_raw(ex["label"], tf.uint8), ex["box_shape"])
        return tf.pad(tf.slice(volume, begin, size), paddings)

    return tf.cond(
        ex["has_label"], window, lambda: tf.zeros(size + tf.reduce_sum(paddings, axis=1), tf.uint8)
    )


def decode_volumes(ex, begin=None, size=None, paddings=None):
    """Decodes image (float32 [d, h, w, 4], exact) and label (uint8 [d, h, w],
    zeros when has_label is False) of a parse_raw dict, optionally windowed and
    padded as in image_planes (before the cast to float32: cheaper)."""
    image = tf.cond(
        tf.equal(ex["image_dtype"], b"int16"),
        lambda: from_byte_planes(image_planes(ex, tf.int16, begin, size, paddings), tf.int16),
        lambda: from_byte_planes(image_planes(ex, tf.float32, begin, size, paddings), tf.float32),
    )
    return image, decode_label(ex, begin, size, paddings)
