"""The tf.data input pipeline over the converter's TFRecord shards.

Train mode (paper §3.5, §3.7): each pass over the dataset (an epoch) yields
every case once, in random order; per case a random crop (drawn in the
original grid, or with crop_from='brain_box' in the stored brain box, padded
where the volume is smaller), random flips on each axis
(p = 0.5), per-channel normalisation over non-zero voxels, random per-channel
intensity scale (0.9-1.1) and shift (+-0.1 std), labels to nested WT/TC/ET.
The dataset is not repeated: iterate it once per epoch.

    {"image": float32 [B, *crop_shape, 4], "label": float32 [B, *crop_shape, 3]}

Eval mode: whole volumes in the original NIfTI grid (or, with
eval_brain_box, the stored brain bounding box), normalisation only, batch 1,
in file order:

    {"image": float32 [1, d, h, w, 4], "label": float32 [1, d, h, w, 3] (when has_labels),
     "case_id": string [1], "original_shape": int32 [1, 3], "box_start": int32 [1, 3],
     "affine": float64 [1, 4, 4]}

A prediction p on the image goes back to the NIfTI grid with
data_pipeline.volume.paste_crop(p, original_shape, box_start) (box_start is 0
for whole volumes), saved with `affine`. The network needs sizes divisible by
8: the inference code pads and crops back.

A shard that cannot be read fails a dataset with TensorFlow's words;
data_pipeline.shards says which shard, and which case, it is.
"""

import tensorflow as tf

from data_pipeline import augment, features, record_format
from data_pipeline.constants import NUM_MODALITIES, NUM_REGIONS
from data_pipeline.input_config import InputConfig
from data_pipeline.shards import READ_BUFFER

_EPS = 1e-8  # std floor of the normalisation: a constant channel (std 0) stays finite
_CACHE_SHUFFLE_BUFFER = 100_000  # > any number of cases: a full shuffle


def list_files(config: InputConfig) -> list[str]:
    """The shard paths of ``config.files``, sorted when given as a pattern
    (tf.io.gfile: local or remote file systems)."""
    if isinstance(config.files, tuple):
        return list(config.files)
    files = sorted(tf.io.gfile.glob(config.files))
    if not files:
        raise ValueError(f"no file matches files={config.files!r}")
    return files


def _check_label(ex, has_labels):
    if has_labels:
        ok = tf.debugging.assert_equal(
            ex["has_label"],
            True,
            message="example without label map (set has_labels=False for unlabelled sets)",
        )
        with tf.control_dependencies([ok]):
            ex["has_label"] = tf.identity(ex["has_label"])
    return ex


def _flip_map_regions(image, label, flip_index, a, b, planes_dtype=None):
    """Fixed-shape tail of the transforms, one XLA kernel when jit-compiled:
    bytes to values (when `image` holds the byte planes of `planes_dtype`
    values), mirror (axes = the bits of flip_index), y = a * x + b per channel
    on the non-zero voxels, labels to regions."""
    if planes_dtype is not None:
        image = features.from_byte_planes(image, planes_dtype)

    def branch(axes):
        def fn():
            x = tf.reverse(image, axes) if axes else image
            y = label if not axes else tf.reverse(label, axes)
            return (tf.where(tf.not_equal(x, 0.0), x * a + b, 0.0), augment.labels_to_regions(y))

        return fn

    combos = [[axis for axis in range(3) if (k >> axis) & 1] for k in range(8)]
    return tf.switch_case(flip_index, [branch(axes) for axes in combos])


_flip_map_regions_xla = tf.function(_flip_map_regions, jit_compile=True)


def train_transform(ex, seeds, config):
    """One training example from a features.parse_raw dict.

    Equal (up to float rounding) to the ops one after another (tests/oracles.py):
    decode the whole box, crop_or_pad at a random_crop_start drawn in the
    original grid, or in the box with crop_from='brain_box' (seeds[0]),
    random_flip (seeds[1]), the normalisation with the stored statistics
    ((x - mean) / max(std, 1e-8) on the non-zero voxels), random_intensity
    (seeds[2]), labels_to_regions. Computed cheaply instead: only the part of
    the window inside the stored box is sliced and padded (as byte planes),
    then bytes to values, flips, normalisation and intensity (one per-channel
    affine map) and the regions run as one fixed-shape function (XLA-compiled
    when config.jit).

    Args:
      ex: dict from features.parse_raw.
      seeds: int [3, 2] stateless seeds (crop, flip, intensity).
      config: InputConfig.
    Returns:
      {"image": float32 [*crop_shape, 4], "label": float32 [*crop_shape, 3]}.
    """
    crop = config.crop_shape
    if config.crop_from == "brain_box":  # drawn in the box, relative to it
        start = augment.random_crop_start(ex["box_shape"], crop, seeds[0])
    else:  # drawn in the original grid, then made relative to the stored box
        start = augment.random_crop_start(ex["original_shape"], crop, seeds[0]) - ex["box_start"]
    begin, extent, paddings = augment.crop_window(start, crop, ex["box_shape"])
    label = tf.ensure_shape(features.decode_label(ex, begin, extent, paddings), crop)
    flip_index = tf.constant(0, tf.int32)
    if config.augment and config.flip:
        mask = augment.flip_mask(seeds[1], config.flip_probability)
        flip_index = tf.reduce_sum(tf.cast(mask, tf.int32) * tf.constant([1, 2, 4]))
    # the normalisation then the random intensity scale and shift, as one affine map per channel.
    a = 1.0 / tf.maximum(ex["nonzero_std"], _EPS)
    b = -ex["nonzero_mean"] * a
    if config.augment and config.intensity:
        s, o = augment.intensity_params(
            seeds[2], NUM_MODALITIES, config.intensity_shift, config.intensity_scale
        )
        a, b = a * s, b * s + o
    fn = _flip_map_regions_xla if config.jit else _flip_map_regions

    def transform(dtype):  # the byte planes go into the fused function as they are
        planes = features.image_planes(ex, dtype, begin, extent, paddings)
        planes = tf.ensure_shape(planes, (dtype.size,) + crop + (NUM_MODALITIES,))
        return fn(planes, label, flip_index, a, b, dtype)

    image, label = tf.cond(
        tf.equal(ex["image_dtype"], b"int16"),
        lambda: transform(tf.int16),
        lambda: transform(tf.float32),
    )
    return {
        "image": tf.ensure_shape(image, crop + (NUM_MODALITIES,)),
        "label": tf.ensure_shape(label, crop + (NUM_REGIONS,)),
    }


def _train_example(config):
    def fn(serialized, example_seed):
        ex = _check_label(features.parse_raw(serialized), True)
        # One int64 per example (Dataset.random) -> independent stateless seeds per op.
        seeds = tf.random.experimental.stateless_split(
            tf.stack([example_seed, tf.constant(config.seed, tf.int64)]), 3
        )
        return train_transform(ex, seeds, config)

    return fn


def _eval_example(config):
    def fn(serialized):
        ex = _check_label(features.parse_raw(serialized), config.has_labels)
        if config.eval_brain_box:
            paddings = None
            box_start = ex["box_start"]
        else:  # back to the original grid: zeros around the stored box
            after = ex["original_shape"] - ex["box_start"] - ex["box_shape"]
            paddings = tf.stack([ex["box_start"], after], axis=1)
            box_start = tf.zeros_like(ex["box_start"])
        label = features.decode_label(ex, paddings=paddings)
        # the normalisation with the stored statistics, as one affine map per
        # channel; XLA-compiled for whole volumes (one shape for all BraTS cases).
        a = 1.0 / tf.maximum(ex["nonzero_std"], _EPS)
        b = -ex["nonzero_mean"] * a
        fn = (
            _flip_map_regions_xla if config.jit and not config.eval_brain_box else _flip_map_regions
        )

        def transform(dtype):
            planes = features.image_planes(ex, dtype, paddings=paddings)
            return fn(planes, label, tf.constant(0), a, b, dtype)

        image, regions = tf.cond(
            tf.equal(ex["image_dtype"], b"int16"),
            lambda: transform(tf.int16),
            lambda: transform(tf.float32),
        )
        out = {
            "case_id": ex["case_id"],
            "image": image,
            "original_shape": ex["original_shape"],
            "box_start": box_start,
            "affine": ex["affine"],
        }
        if config.has_labels:
            out["label"] = regions
        return out

    return fn


def _batch(ds, batch_size, drop_remainder):
    if batch_size == 1:  # a reshape, where batch() would copy ~100 MB per case
        return ds.map(lambda ex: tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), ex))
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def _share_of_pipeline(config, input_context):
    """(this input pipeline's files, its batch size, whether it takes every
    n-th example instead: fewer shards than pipelines) under tf.distribute."""
    files = list_files(config)
    if input_context is None:
        return files, config.batch_size, False
    batch_size = input_context.get_per_replica_batch_size(config.batch_size)
    n = input_context.num_input_pipelines
    if n > 1 and len(files) >= n:
        return files[input_context.input_pipeline_id :: n], batch_size, False
    return files, batch_size, n > 1


def _records(config, files, seed):
    """The serialized examples of ``files``: in file order (eval mode, or
    train mode's cache), else shards interleaved, in a shuffled order."""
    if config.mode == "train" and config.cache:
        # Files in a fixed order into the cache, then a shuffle over every case
        # (the buffer holds references to cached tensors, not copies).
        return tf.data.TFRecordDataset(
            files,
            record_format.COMPRESSION,
            READ_BUFFER,
            num_parallel_reads=min(config.cycle_length, len(files)),
        )
    if config.mode != "train":
        # in file order
        return tf.data.TFRecordDataset(files, record_format.COMPRESSION, READ_BUFFER)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if config.shuffle:
        # Shard order changes every epoch; with the example buffer in
        # make_dataset it gives a random case order (each case still once per epoch).
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, record_format.COMPRESSION, READ_BUFFER),
        cycle_length=min(config.cycle_length, len(files)),
        block_length=1,
        num_parallel_calls=config.num_parallel_calls,
        deterministic=config.deterministic,
    )


def make_dataset(config, input_context=None):
    """The tf.data.Dataset of `config` (see the module doc for its elements).

    Args:
      config: InputConfig.
      input_context: tf.distribute.InputContext or None. With several input
        pipelines, each reads its share of the shards (of the examples when
        there are fewer shards than pipelines) and batches
        config.batch_size / num_replicas_in_sync.
    """
    train = config.mode == "train"
    seed = config.seed if config.deterministic else None
    files, batch_size, shard_examples = _share_of_pipeline(config, input_context)
    ds = _records(config, files, seed)
    if shard_examples:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if train:
        if config.cache:
            ds = ds.cache()
        if config.shuffle:
            buffer = _CACHE_SHUFFLE_BUFFER if config.cache else config.shuffle_buffer
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        # Per-example augmentation seeds: a new stream each epoch, fixed by the
        # seed in deterministic mode.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds))
        ds = ds.map(
            _train_example(config),
            num_parallel_calls=config.num_parallel_calls,
            deterministic=config.deterministic,
        )
        ds = _batch(ds, batch_size, config.drop_remainder)
    else:
        ds = ds.map(
            _eval_example(config), num_parallel_calls=config.num_parallel_calls, deterministic=True
        )
        ds = _batch(ds, 1, False)
    ds = ds.prefetch(config.prefetch)
    options = tf.data.Options()
    options.deterministic = config.deterministic or not train
    return ds.with_options(options)
