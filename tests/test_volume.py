"""volume.py: label maps -> regions, padding and cropping back, boxes, pasting a
crop back, normalisation statistics, against hand-computed values and NumPy."""

import numpy as np
import oracles
import pytest

from data_pipeline import constants as C
from data_pipeline import volume as V

WT, TC, ET = (C.REGIONS.index(r) for r in ("WT", "TC", "ET"))

# (spatial shape, mode, the expected (before, after) padding to a multiple of 8)
PAD_CASES = [
    ((240, 240, 155), "symmetric", ((0, 0), (0, 0), (2, 3))),
    ((240, 240, 155), "end", ((0, 0), (0, 0), (0, 5))),
    ((5, 7, 9), "symmetric", ((1, 2), (0, 1), (3, 4))),
    ((5, 7, 9), "end", ((0, 3), (0, 1), (0, 7))),
    ((8, 16, 1), "symmetric", ((0, 0), (0, 0), (3, 4))),
]


def make_image(rng, shape=(6, 7, 5)):
    """A raw 4-channel case: background zeros, an all-zero channel and a constant one."""
    image = rng.uniform(50, 900, size=shape + (4,)).astype(np.float32)
    image[..., 0][rng.random(shape) < 0.4] = 0  # background voxels
    image[..., 1] = 0  # an all-zero channel (missing modality)
    image[..., 2][rng.random(shape) < 0.5] = 0
    image[..., 2][image[..., 2] != 0] = 123.0  # a constant channel: std 0
    return image


def numpy_reference_normalize(image):
    """Per channel: boolean indexing, np.mean / np.std (ddof=0), std 0 -> 1."""
    out = np.zeros(image.shape, np.float64)
    for c in range(image.shape[-1]):
        ch = image[..., c].astype(np.float64)
        nz = ch != 0
        if nz.any():
            std = ch[nz].std() or 1.0
            out[..., c][nz] = (ch[nz] - ch[nz].mean()) / std
    return out


# ------------------------------------------------------------ labels -> regions
@pytest.mark.parametrize("et_label", [C.LABEL_ET, C.LABEL_ET_2023])
def test_labels_to_regions_hand_made(et_label):
    labels = np.array([[[C.LABEL_BACKGROUND, C.LABEL_NCR_NET, C.LABEL_ED, et_label]]])
    regions = V.labels_to_regions(labels, et_label=et_label)
    assert regions.shape == (1, 1, 4, 3) and regions.dtype == bool
    # columns: background, NCR/NET, ED, ET
    np.testing.assert_array_equal(regions[0, 0, :, WT], [False, True, True, True])
    np.testing.assert_array_equal(regions[0, 0, :, TC], [False, True, False, True])
    np.testing.assert_array_equal(regions[0, 0, :, ET], [False, False, False, True])
    assert V.region_labels(et_label) == ((1, 2, et_label), (1, et_label), (et_label,))


def test_labels_to_regions_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"\[3\]"):
        V.labels_to_regions(np.array([0, 1, 3]), et_label=C.LABEL_ET)
    with pytest.raises(ValueError, match=r"\[4\]"):
        V.labels_to_regions(np.array([0, 4]), et_label=C.LABEL_ET_2023)
    with pytest.raises(ValueError, match="et_label"):
        V.labels_to_regions(np.array([0]), et_label=5)
    with pytest.raises(ValueError, match="float64"):
        V.labels_to_regions(np.array([0.0, 1.5]))
    # whole numbers stored as floats (a NIfTI read as float) are labels
    np.testing.assert_array_equal(
        V.labels_to_regions(np.array([0.0, 4.0])), V.labels_to_regions(np.array([0, 4]))
    )


def test_threshold_check():
    assert V.check_threshold(0) == 0.0 and V.check_threshold(np.float32(0.5)) == 0.5
    for bad in (1.0, -0.1, "x", None, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\), got "):
            V.check_threshold(bad)


# ------------------------------------------------------------------- padding
@pytest.mark.parametrize("shape, mode, expected_pads", PAD_CASES)
def test_pad_crop_round_trip(shape, mode, expected_pads):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=shape + (2,)).astype(np.float32) + 10.0  # no zeros inside
    padded, pads = oracles.pad_to_multiple(volume, 8, mode)
    assert pads == expected_pads == oracles.padding_for(shape, 8, mode)
    assert all(n % 8 == 0 for n in padded.shape[:3]) and padded.shape[3] == 2
    np.testing.assert_array_equal(oracles.crop_back(padded, pads), volume)
    # everything outside the original box is zero padding
    assert np.count_nonzero(padded) == volume.size
    # a batch pads its spatial axes 1, 2, 3
    batch, batch_pads = oracles.pad_to_multiple(volume[None], 8, mode)
    assert batch_pads == pads
    np.testing.assert_array_equal(batch[0], padded)


def test_pad_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple"):
        oracles.pad_to_multiple(np.zeros((3, 3, 3)), 0)
    with pytest.raises(ValueError, match="'middle'"):
        oracles.pad_to_multiple(np.zeros((3, 3, 3)), 8, "middle")
    with pytest.raises(ValueError, match="2 dims"):
        oracles.pad_to_multiple(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="do not fit"):
        oracles.crop_back(np.zeros((4, 4, 4)), ((2, 2), (0, 0), (0, 0)))


# ------------------------------------------------------------------- boxes
def test_nonzero_box_and_paste_crop():
    a = np.zeros((6, 7, 8), np.int16)
    b = np.zeros((6, 7, 8), np.uint8)
    a[1:3, 2, 4:6] = 5
    b[4, 3, 1] = 2
    start, stop = V.nonzero_box([a, b])
    assert (start, stop) == ((1, 2, 1), (5, 4, 6))
    box = tuple(slice(s, e) for s, e in zip(start, stop))
    np.testing.assert_array_equal(V.paste_crop(a[box], a.shape, start), a)
    stacked = np.stack([a, b.astype(np.int16)], -1)
    np.testing.assert_array_equal(V.paste_crop(stacked[box], a.shape, np.array(start)), stacked)
    assert V.nonzero_box([np.zeros((3, 3, 3))]) == ((0, 0, 0), (1, 1, 1))


def test_paste_crop_values_and_bounds():
    sub = np.arange(8).reshape(2, 2, 2)
    full = V.paste_crop(sub, (4, 3, 5), (2, 1, 3))
    assert full.shape == (4, 3, 5) and full.sum() == sub.sum() and full.dtype == sub.dtype
    np.testing.assert_array_equal(full[2:4, 1:3, 3:5], sub)
    assert (V.paste_crop(sub, (4, 3, 5), (0, 0, 0), fill=-1) == -1).sum() == 60 - 8
    with pytest.raises(ValueError, match=r"\(3, 1, 3\)"):
        V.paste_crop(sub, (4, 3, 5), (3, 1, 3))


# ----------------------------------------------------------- normalisation
def test_nonzero_stats():
    image = np.zeros((4, 4, 4, 2), np.int16)
    image[0, 0, :2, 0] = [2, 4]
    image[1, 1, 1, 1] = 7
    mean, std = V.nonzero_stats(image)
    assert mean.dtype == std.dtype == np.float64
    np.testing.assert_allclose(mean, [3.0, 7.0])
    np.testing.assert_allclose(std, [1.0, 0.0])
    mean, std = V.nonzero_stats(np.zeros((2, 2, 2, 1)))
    assert (mean[0], std[0]) == (0.0, 1.0)


def test_normalize_nonzero_matches_numpy():
    rng = np.random.default_rng(2)
    image = make_image(rng)
    before = image.copy()
    out = V.normalize_nonzero(image)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, numpy_reference_normalize(image), atol=1e-5)
    assert np.all(out[image == 0] == 0)
    assert np.all(out[..., 1] == 0) and np.all(out[..., 2] == 0)
    nz = image[..., 0] != 0
    assert abs(out[..., 0][nz].mean()) < 1e-5 and abs(out[..., 0][nz].std() - 1) < 1e-5
    # (1 - 3) / 1 and (3 - 3) / 1 by hand: mean 3, std 1 over the non-zero voxels
    np.testing.assert_array_equal(
        V.normalize_nonzero(np.array([[[[0], [2], [4]]]]))[0, 0, :, 0], [0.0, -1.0, 1.0]
    )


def test_normalize_nonzero_of_a_batch_is_per_example():
    rng = np.random.default_rng(3)
    batch = np.stack([make_image(rng), make_image(rng) * 3.0 + 7.0])
    batch[1][batch[1] == 7.0] = 0.0  # keep the zero background of the second example
    out = V.normalize_nonzero(batch)
    for b in range(2):
        np.testing.assert_array_equal(out[b], V.normalize_nonzero(batch[b]))
        np.testing.assert_allclose(out[b], numpy_reference_normalize(batch[b]), atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        V.normalize_nonzero(np.full((2, 2, 2, 1), np.nan))
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        V.normalize_nonzero(np.zeros((2, 2, 2)))
