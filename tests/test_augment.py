"""Pre-processing and augmentation ops against NumPy, eagerly and inside Dataset.map."""

import itertools

import numpy as np
import oracles
import pytest
import tensorflow as tf

from data_pipeline import augment, volume
from data_pipeline.constants import LABEL_ED, LABEL_ET, LABEL_ET_2023, LABEL_NCR_NET, REGIONS

SEED = tf.constant([3, 7], tf.int64)


def _volume(shape=(6, 7, 5, 4), seed=0):
    """Random positive intensities with a zero background block, and labels."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(1.0, 100.0, shape).astype(np.float32)
    image[:2] = 0.0
    image[:, :, :1] = 0.0
    label = rng.choice(np.array([0, LABEL_NCR_NET, LABEL_ED, LABEL_ET], np.uint8), shape[:3])
    return image, label


def _np_crop_or_pad(array, start, size):
    margin = 50
    padded = np.pad(array, [(margin, margin)] * 3 + [(0, 0)] * (array.ndim - 3))
    idx = tuple(slice(s + margin, s + margin + n) for s, n in zip(start, size))
    return padded[idx]


@pytest.mark.parametrize(
    "start,size",
    [
        ((0, 0, 0), (6, 7, 5)),
        ((1, 2, 0), (4, 4, 4)),
        ((-2, 3, 1), (8, 4, 6)),
        ((4, -3, -1), (4, 12, 9)),
        ((10, 0, 0), (3, 3, 3)),
        ((-9, -9, -9), (3, 3, 3)),
    ],
)
def test_crop_or_pad(start, size):
    image, label = _volume()
    np.testing.assert_array_equal(
        oracles.crop_or_pad(image, start, size).numpy(), _np_crop_or_pad(image, start, size)
    )
    np.testing.assert_array_equal(
        oracles.crop_or_pad(label, start, size).numpy(), _np_crop_or_pad(label, start, size)
    )


@pytest.mark.parametrize(
    "full,crop,expected",
    [
        ((6, 7, 5), (4, 7, 2), [(0, 1, 2), (0,), (0, 1, 2, 3)]),  # crop inside: [0, full - crop]
        ((6, 7, 5), (8, 9, 5), [(-2, -1, 0), (-2, -1, 0), (0,)]),  # volume smaller: padded
    ],
)
def test_random_crop_start_is_uniform_over_all_positions(full, crop, expected):
    starts = np.array(
        [augment.random_crop_start(full, crop, tf.constant([s, 1])).numpy() for s in range(300)]
    )
    for axis in range(3):
        values, counts = np.unique(starts[:, axis], return_counts=True)
        assert tuple(values) == expected[axis]
        assert counts.min() > 300 / len(values) * 0.6  # roughly uniform


@pytest.mark.parametrize("crop", [(4, 4, 4), (8, 9, 4)])
def test_random_crop_or_pad_same_window_for_image_and_label(crop):
    image, label = _volume()
    out_img, out_lab = oracles.random_crop_or_pad(image, label, crop, SEED)
    start = augment.random_crop_start(image.shape[:3], crop, SEED).numpy()
    np.testing.assert_array_equal(out_img.numpy(), _np_crop_or_pad(image, start, crop))
    np.testing.assert_array_equal(out_lab.numpy(), _np_crop_or_pad(label, start, crop))


@pytest.mark.parametrize("seed", range(5))
def test_crop_from_stored_box_equals_crop_of_full_volume(seed):
    """The converter stores the brain box; cropping it with full_shape/box_start
    must give the same window as cropping the full zero-background volume."""
    full = np.zeros((12, 10, 9, 4), np.float32)
    box_start, box = (3, 2, 4), (5, 6, 3)
    full[3:8, 2:8, 4:7] = np.random.default_rng(seed).uniform(1, 9, box + (4,))
    stored = full[3:8, 2:8, 4:7]
    crop, s = (8, 7, 6), tf.constant([seed, 0])
    expected, _ = oracles.random_crop_or_pad(full, None, crop, s)
    got, _ = oracles.random_crop_or_pad(
        stored, None, crop, s, full_shape=full.shape[:3], box_start=box_start
    )
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_random_flip_matches_numpy_and_flips_half_the_time():
    image, label = _volume()
    flips = []
    for s in range(200):
        seed = tf.constant([s, 2])
        mask = augment.flip_mask(seed).numpy()
        axes = tuple(np.flatnonzero(mask))
        out_img, out_lab = oracles.random_flip(image, label, seed)
        np.testing.assert_array_equal(out_img.numpy(), np.flip(image, axes) if axes else image)
        np.testing.assert_array_equal(out_lab.numpy(), np.flip(label, axes) if axes else label)
        flips.append(mask)
    rate = np.mean(flips, axis=0)
    assert np.all((rate > 0.35) & (rate < 0.65))


@pytest.mark.parametrize("probability,expected", [(0.0, False), (1.0, True)])
def test_flip_probability_bounds(probability, expected):
    assert (augment.flip_mask(SEED, probability).numpy() == expected).all()


def test_random_intensity_matches_numpy():
    image, _ = _volume()
    image = volume.normalize_nonzero(image)
    scales, shifts = [], []
    for s in range(50):
        seed = tf.constant([s, 5])
        out = oracles.random_intensity(image, seed).numpy()
        scale, shift = (t.numpy() for t in augment.intensity_params(seed, 4))
        np.testing.assert_allclose(
            out, np.where(image != 0, image * scale + shift, 0), rtol=1e-6, atol=1e-6
        )
        scales.append(scale)
        shifts.append(shift)
    scales, shifts = np.array(scales), np.array(shifts)
    assert scales.min() >= 0.9 and scales.max() <= 1.1 and np.ptp(scales) > 0.1
    assert shifts.min() >= -0.1 and shifts.max() <= 0.1 and np.ptp(shifts) > 0.1
    assert len(np.unique(scales[0])) == 4  # drawn per channel


def test_random_intensity_shift_in_channel_stds():
    image = np.ones((2, 2, 2, 1), np.float32)
    out = oracles.random_intensity(image, SEED, shift=0.1, scale=(1.0, 1.0), std=10.0).numpy()
    _, shift = augment.intensity_params(SEED, 1, 0.1, (1.0, 1.0))
    np.testing.assert_allclose(out, np.full((2, 2, 2, 1), 1.0 + 10.0 * shift.numpy()), rtol=1e-6)


def test_labels_to_regions_hand_made():
    label = np.array([0, LABEL_NCR_NET, LABEL_ED, LABEL_ET], np.uint8).reshape(1, 2, 2)
    expected = np.array(
        [
            [0, 0, 0],  # background
            [1, 1, 0],  # necrotic / non-enhancing core: WT, TC
            [1, 0, 0],  # edema: WT
            [1, 1, 1],
        ],  # enhancing: WT, TC, ET
        np.float32,
    ).reshape(1, 2, 2, 3)
    assert REGIONS == ("WT", "TC", "ET")
    out = augment.labels_to_regions(label)
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), expected)


def test_labels_to_regions_equals_the_numpy_version():
    """The input pipeline's graph version gives volume.labels_to_regions' masks
    on the stored label values (ET = 4), and puts a BraTS 2023 ET (3), which
    the converter maps to 4 before storing, in no region."""
    label = np.random.default_rng(4).choice(
        np.array([0, LABEL_NCR_NET, LABEL_ED, LABEL_ET], np.uint8), (7, 6, 5)
    )
    np.testing.assert_array_equal(
        augment.labels_to_regions(label).numpy(), volume.labels_to_regions(label).astype(np.float32)
    )
    assert not augment.labels_to_regions(np.array([LABEL_ET_2023])).numpy().any()


OPS = {
    "random_crop_or_pad": lambda img, lab, seed: oracles.random_crop_or_pad(
        img, lab, (4, 8, 3), seed
    ),
    "random_flip": lambda img, lab, seed: oracles.random_flip(img, lab, seed),
    "random_intensity": lambda img, lab, seed: oracles.random_intensity(img, seed),
    "labels_to_regions": lambda img, lab, seed: augment.labels_to_regions(lab),
}


@pytest.mark.parametrize("name,seed", list(itertools.product(OPS, [0, 1])))
def test_eager_equals_dataset_map_and_is_deterministic(name, seed):
    image, label = _volume()
    op = OPS[name]
    s = tf.constant([seed, 11], tf.int64)
    eager = tf.nest.flatten(op(image, label, s))
    ds = tf.data.Dataset.from_tensors((image, label, s)).repeat(2).map(op)
    for mapped in ds:
        for a, b in zip(eager, tf.nest.flatten(mapped)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("name", ["random_crop_or_pad", "random_flip", "random_intensity"])
def test_different_seeds_differ(name):
    image, label = _volume()
    outs = [
        tf.nest.flatten(OPS[name](image, label, tf.constant([s, 0])))[0].numpy() for s in range(6)
    ]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])
