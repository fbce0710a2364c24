"""The tf.data input pipeline: config checks, the fused training transform against
the reference ops, epochs, determinism, eval mode, tf.distribute sharding."""

import dataclasses
import glob
import itertools
import os

import numpy as np
import oracles
import pytest
import tensorflow as tf

from data_pipeline import augment, convert, features, record_format, synthetic
from data_pipeline.constants import LABEL_ED, LABEL_ET, LABEL_NCR_NET, PAPER_CROP
from data_pipeline.input import InputConfig, make_dataset, train_transform
from data_pipeline.manifest import fold_files, read_manifest
from data_pipeline.volume import paste_crop

SHAPE = (40, 44, 32)
BIG_CROP = (48, 48, 40)  # larger than the volume: every crop holds the whole case
NUM_CASES = 5


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nifti"))
    synthetic.write_synthetic_dataset(root, NUM_CASES, SHAPE, seed=0, progress=False)
    out = str(tmp_path_factory.mktemp("records"))
    manifest = convert.convert(root, out, cases_per_shard=1, folds=1, progress=False)
    files = sorted(glob.glob(os.path.join(out, "*" + record_format.SHARD_SUFFIX)))
    wt = {
        c["case_id"]: sum(c["label_counts"][str(v)] for v in (LABEL_NCR_NET, LABEL_ED, LABEL_ET))
        for c in manifest["cases"]
    }
    assert len(set(wt.values())) == NUM_CASES  # whole-tumour size identifies a case below
    return out, files, wt


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nifti_nolabel"))
    for case_dir in synthetic.write_synthetic_dataset(root, 2, SHAPE, seed=1, progress=False):
        os.remove(os.path.join(case_dir, os.path.basename(case_dir) + "_seg.nii.gz"))
    out = str(tmp_path_factory.mktemp("records_nolabel"))
    convert.convert(root, out, folds=1, progress=False)
    return sorted(glob.glob(os.path.join(out, "*" + record_format.SHARD_SUFFIX)))


@pytest.mark.parametrize(
    "kwargs,quoted",
    [
        (dict(mode="test"), "'test'"),
        (dict(crop_shape=(160, 192)), "(160, 192)"),
        (dict(crop_shape=(160, 0, 128)), "(160, 0, 128)"),
        (dict(batch_size=0), "0"),
        (dict(mode="eval", batch_size=2), "2"),
        (dict(has_labels=False), "False"),
        (dict(flip_probability=1.5), "1.5"),
        (dict(intensity_shift=-0.1), "-0.1"),
        (dict(intensity_scale=(1.1, 0.9)), "(1.1, 0.9)"),
        (dict(shuffle_buffer=0), "0"),
        (dict(num_parallel_calls=0), "0"),
        (dict(files=[]), "empty"),
        (dict(files=3), "3"),
    ],
)
def test_config_rejects_bad_values(kwargs, quoted):
    args = dict(files="x/*.tfrecord") | kwargs
    with pytest.raises(ValueError) as error:
        InputConfig(**args)
    assert quoted in str(error.value)


def test_config_defaults_are_the_paper():
    config = InputConfig(files="x")
    assert config.crop_shape == PAPER_CROP and config.batch_size == 1
    assert config.intensity_shift == 0.1 and config.intensity_scale == (0.9, 1.1)
    assert config.flip_probability == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1


def test_no_files_match(tmp_path):
    with pytest.raises(ValueError, match="no file matches"):
        make_dataset(InputConfig(files=str(tmp_path / "*.tfrecord")))


def _reference(ex, seeds, config):
    """The paper's steps, one reference op after another, on the decoded box."""
    image, label = features.decode_volumes(ex)
    image, label = oracles.random_crop_or_pad(
        image,
        label,
        config.crop_shape,
        seeds[0],
        full_shape=ex["original_shape"],
        box_start=ex["box_start"],
    )
    if config.augment and config.flip:
        image, label = oracles.random_flip(image, label, seeds[1], config.flip_probability)
    # normalisation with the stored statistics, on the non-zero voxels (std floored at 1e-8)
    image = tf.where(
        image != 0.0, (image - ex["nonzero_mean"]) / tf.maximum(ex["nonzero_std"], 1e-8), 0.0
    )
    if config.augment and config.intensity:
        image = oracles.random_intensity(
            image, seeds[2], config.intensity_shift, config.intensity_scale
        )
    return image.numpy(), augment.labels_to_regions(label).numpy()


@pytest.mark.parametrize(
    "crop,jit,augmented,seed",
    [
        (c, j, a, s)
        for (c, j, a), s in itertools.product(
            [
                ((24, 24, 16), True, True),
                (BIG_CROP, True, True),
                ((24, 48, 16), False, True),
                ((24, 24, 16), True, False),
            ],
            range(4),
        )
    ],
)
def test_train_transform_equals_reference_ops(records, crop, jit, augmented, seed):
    _, files, _ = records
    config = InputConfig(files=files, crop_shape=crop, jit=jit, augment=augmented)
    shard = files[seed % len(files)]
    record = next(iter(tf.data.TFRecordDataset(shard, record_format.COMPRESSION)))
    ex = features.parse_raw(record)
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, 9], tf.int64), 3)
    out = train_transform(ex, seeds, config)
    ref_image, ref_label = _reference(ex, seeds, config)
    np.testing.assert_allclose(out["image"].numpy(), ref_image, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["label"].numpy(), ref_label)


def _wt_sizes(ds):
    return [
        int(b["label"][i, ..., 0].numpy().sum()) for b in ds for i in range(b["label"].shape[0])
    ]


def test_train_elements(records):
    _, files, _ = records
    ds = make_dataset(InputConfig(files=files, crop_shape=(24, 32, 16), batch_size=2))
    batches = list(ds)
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].dtype == tf.float32 and b["label"].dtype == tf.float32
        assert b["image"].shape[1:] == (24, 32, 16, 4) and b["label"].shape[1:] == (24, 32, 16, 3)
        image, label = b["image"].numpy(), b["label"].numpy()
        assert np.isfinite(image).all()
        assert set(np.unique(label)) <= {0.0, 1.0}
        wt, tc, et = label[..., 0], label[..., 1], label[..., 2]
        assert (et <= tc).all() and (tc <= wt).all()  # nested regions
    spec = ds.element_spec["image"]
    assert spec.shape.as_list() == [None, 24, 32, 16, 4]


@pytest.mark.parametrize("cache", [False, True])
def test_each_epoch_sees_each_case_once_in_random_order(records, cache):
    _, files, wt = records
    ds = make_dataset(
        InputConfig(files=files, crop_shape=BIG_CROP, deterministic=True, seed=4, cache=cache)
    )
    epochs = [_wt_sizes(ds) for _ in range(3)]
    for sizes in epochs:
        assert sorted(sizes) == sorted(wt.values())
    assert len({tuple(e) for e in epochs}) > 1  # the order changes between epochs


def test_drop_remainder(records):
    _, files, _ = records
    ds = make_dataset(
        InputConfig(files=files, crop_shape=(16, 16, 16), batch_size=2, drop_remainder=True)
    )
    assert [b["image"].shape[0] for b in ds] == [2, 2]


def test_deterministic_mode(records):
    _, files, _ = records
    config = InputConfig(files=files, crop_shape=(24, 24, 16), deterministic=True, seed=1)

    def run(c):
        ds = make_dataset(c)
        return [b["image"].numpy() for _ in range(2) for b in ds]

    a, b = run(config), run(config)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = run(dataclasses.replace(config, seed=2))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    # two epochs of one dataset differ (new crops, flips, order)
    assert any(not np.array_equal(x, y) for x, y in zip(a[:NUM_CASES], a[NUM_CASES:]))


def test_augmentation_is_random_without_deterministic(records):
    _, files, _ = records
    ds = make_dataset(InputConfig(files=files[:1], crop_shape=(16, 16, 16)))
    outs = [next(iter(ds))["image"].numpy() for _ in range(4)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("brain_box", [False, True])
def test_eval_mode_whole_volumes(records, brain_box):
    out, files, _ = records
    stored = {}
    for record in tf.data.TFRecordDataset(files, record_format.COMPRESSION):
        ex = {k: v.numpy() for k, v in oracles.parse_example(record).items()}
        stored[ex["case_id"].decode()] = ex
    ds = make_dataset(
        InputConfig(
            files=os.path.join(out, "*" + record_format.SHARD_SUFFIX),
            mode="eval",
            eval_brain_box=brain_box,
        )
    )
    seen = []
    for b in ds:
        assert set(b) == {"image", "label", "case_id", "original_shape", "box_start", "affine"}
        b = {k: v.numpy()[0] for k, v in b.items()}  # batch 1
        case_id = b["case_id"].decode()
        seen.append(case_id)
        ex = stored[case_id]
        # NumPy reference: the NIfTI arrays (box pasted back), normalised over non-zero voxels
        full_image = paste_crop(ex["image"], ex["original_shape"], ex["box_start"])
        full_label = paste_crop(ex["label"], ex["original_shape"], ex["box_start"])
        expected = np.where(
            full_image != 0, (full_image - ex["nonzero_mean"]) / ex["nonzero_std"], 0
        )
        if brain_box:
            assert b["image"].shape[:3] == tuple(ex["box_shape"])
            np.testing.assert_array_equal(b["box_start"], ex["box_start"])
        else:
            assert b["image"].shape[:3] == SHAPE
            np.testing.assert_array_equal(b["box_start"], [0, 0, 0])
        np.testing.assert_array_equal(b["original_shape"], SHAPE)
        np.testing.assert_array_equal(b["affine"], np.eye(4))
        # geometry: pasting back at box_start gives the NIfTI grid
        image = paste_crop(b["image"], b["original_shape"], b["box_start"])
        np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)
        regions = paste_crop(b["label"], b["original_shape"], b["box_start"])
        np.testing.assert_array_equal(regions[..., 0], full_label > 0)
        np.testing.assert_array_equal(regions[..., 2], full_label == LABEL_ET)
    assert seen == list(stored)  # file order, each case once


def test_eval_without_labels(unlabelled):
    ds = make_dataset(InputConfig(files=unlabelled, mode="eval", has_labels=False))
    batches = list(ds)
    assert len(batches) == 2 and all("label" not in b for b in batches)
    with pytest.raises(tf.errors.InvalidArgumentError, match="without label"):
        list(make_dataset(InputConfig(files=unlabelled, mode="eval")))


@pytest.mark.parametrize("cases_per_shard", [1, NUM_CASES])  # shards >= / < pipelines
def test_distribute_input_context_shards(records, tmp_path, cases_per_shard):
    out, files, wt = records
    if cases_per_shard != 1:
        manifest = read_manifest(out)
        root = manifest["input_dir"]
        convert.convert(
            root, str(tmp_path), cases_per_shard=cases_per_shard, folds=1, progress=False
        )
        files = sorted(glob.glob(str(tmp_path / ("*" + record_format.SHARD_SUFFIX))))
        assert len(files) == 1
    per_pipeline = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2
        )
        ds = make_dataset(InputConfig(files=files, crop_shape=BIG_CROP, batch_size=2), context)
        batches = list(ds)
        assert all(b["image"].shape[0] == 1 for b in batches)  # global batch 2 over 2 replicas
        per_pipeline.append(_wt_sizes(batches))
    assert per_pipeline[0] and per_pipeline[1]
    assert sorted(per_pipeline[0] + per_pipeline[1]) == sorted(wt.values())


def test_fold_files_feed_make_dataset(tmp_path, records):
    out, _, _ = records
    root = read_manifest(out)["input_dir"]
    convert.convert(root, str(tmp_path), folds=5, cases_per_shard=2, progress=False)
    train, val = fold_files(str(tmp_path), 0)
    n_train = sum(1 for _ in make_dataset(InputConfig(files=train, crop_shape=(16, 16, 16))))
    n_val = sum(1 for _ in make_dataset(InputConfig(files=val, mode="eval")))
    assert (n_train, n_val) == (NUM_CASES - 1, 1)


@pytest.mark.parametrize("jit,seed", list(itertools.product([True, False], range(2))))
def test_train_transform_float32_storage(jit, seed):
    images, label = synthetic.make_case(SHAPE, seed=seed)
    image = np.stack([images[m] for m in ("t1", "t1ce", "t2", "flair")], -1).astype(np.float32)
    image = np.where(image != 0, image + 0.25, 0).astype(np.float32)  # not int16-representable
    record = features.serialize_example("float_case", image, label, SHAPE, np.eye(4), (0, 0, 0))
    ex = features.parse_raw(tf.constant(record))
    assert ex["image_dtype"].numpy() == b"float32"
    config = InputConfig(files="x", crop_shape=(24, 24, 16), jit=jit)
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, 3], tf.int64), 3)
    out = train_transform(ex, seeds, config)
    ref_image, ref_label = _reference(ex, seeds, config)
    np.testing.assert_allclose(out["image"].numpy(), ref_image, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["label"].numpy(), ref_label)
    np.testing.assert_array_equal(
        oracles.parse_example(tf.constant(record))["image"].numpy(), image
    )


def _offset_in(box: np.ndarray, crop: np.ndarray):
    """The offsets o at which box[o:o + crop.shape] equals crop, by exhaustive search."""
    c = crop.shape[:3]
    return [
        o
        for o in itertools.product(*(range(b - k + 1) for b, k in zip(box.shape, c)))
        if np.array_equal(box[o[0] : o[0] + c[0], o[1] : o[1] + c[1], o[2] : o[2] + c[2]], crop)
    ]


def test_brain_box_crops_lie_inside_the_box_and_move(records):
    """crop_from='brain_box': every crop smaller than the stored box is a window
    of the box (found by exhaustive search in the decoded box), at offsets that
    vary with the seed; from the grid, windows of the same size reach outside
    the box (zero padding) for some seeds."""
    _, files, _ = records
    crop = (16, 16, 16)
    record = next(iter(tf.data.TFRecordDataset(files[0], record_format.COMPRESSION)))
    ex = features.parse_raw(record)
    box_image, _ = features.decode_volumes(ex)
    box_t1 = box_image.numpy()[..., 0]
    assert all(b > k for b, k in zip(box_t1.shape, crop))
    normalised = InputConfig(files=files, crop_shape=crop, augment=False)
    offsets, outside = set(), 0
    for seed in range(12):
        seeds = tf.random.experimental.stateless_split(tf.constant([seed, 3], tf.int64), 3)
        inside = train_transform(ex, seeds, dataclasses.replace(normalised, crop_from="brain_box"))
        # un-normalise T1 (the affine map of the non-zero voxels) to find it in the box
        mean, std = ex["nonzero_mean"].numpy()[0], max(ex["nonzero_std"].numpy()[0], 1e-8)
        t1 = inside["image"].numpy()[..., 0]
        t1 = np.where(t1 != 0, np.rint(t1 * std + mean), 0)
        found = _offset_in(box_t1, t1)
        assert found, f"seed {seed}: the brain_box crop is not a window of the box"
        offsets.add(found[0])
        grid = train_transform(ex, seeds, normalised)["image"].numpy()[..., 0]
        grid = np.where(grid != 0, np.rint(grid * std + mean), 0)
        outside += not _offset_in(box_t1, grid)
    assert len(offsets) > 3
    assert outside > 0


def test_crop_from_is_checked():
    with pytest.raises(ValueError, match="'box'"):
        InputConfig(files="x", crop_from="box")
