"""metrics.py against hand-computed values and brute-force references."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial.distance import cdist

from brats_tf import metrics as M
from data_pipeline import constants as C


def cube(shape, start, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def brute_surface(mask):
    """Voxels of the mask with a 6-neighbour outside the mask or outside the image."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        p = tuple(i + 1 for i in idx)
        for axis in range(3):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                if not padded[tuple(q)]:
                    out[idx] = True
    return out


def brute_hd95(pred, truth, spacing, mode):
    a = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(brute_surface(truth)) * np.asarray(spacing)
    d = cdist(a, b)
    a_to_b, b_to_a = d.min(axis=1), d.min(axis=0)
    if mode == "pooled":
        return np.percentile(np.concatenate([a_to_b, b_to_a]), 95)
    return max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))


# ------------------------------------------------------------------ Dice, HD95
def test_dice_of_shifted_cube():
    truth = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (3, 2, 2), 4)  # overlap 3 x 4 x 4 = 48 of 64
    assert M.dice(pred, truth) == pytest.approx(2 * 48 / 128)
    assert M.dice(truth, truth) == 1.0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5), (0.8, 1.2, 2.0)])
def test_hd95_of_cube_shifted_by_k(k, axis, spacing):
    truth = cube((20, 20, 20), (5, 5, 5), 8)
    shift = [5, 5, 5]
    shift[axis] += k
    pred = cube((20, 20, 20), shift, 8)
    assert M.hausdorff95(pred, truth, spacing) == pytest.approx(k * spacing[axis])
    assert M.hausdorff95(pred, truth, spacing, mode="max_directed") == pytest.approx(
        k * spacing[axis]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5)])
@pytest.mark.parametrize("mode", M.HD95_MODES)
def test_hd95_matches_brute_force_on_random_blobs(seed, spacing, mode):
    rng = np.random.default_rng(seed)
    shape = (12, 11, 9)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    blobs = []
    for _ in range(2):
        centre = rng.uniform(3, 7, 3)
        radius = rng.uniform(2, 4)
        blob = np.linalg.norm(grid - centre, axis=-1) < radius
        blob |= rng.random(shape) < 0.02  # scattered false positives
        blobs.append(blob)
    pred, truth = blobs
    expected = brute_hd95(pred, truth, spacing, mode)
    assert M.hausdorff95(pred, truth, spacing, mode) == pytest.approx(expected, rel=1e-9)
    np.testing.assert_array_equal(M.surface(pred), brute_surface(pred))


@pytest.mark.parametrize("corner", [(0, 0, 0), (12, 13, 14)])
def test_hd95_of_masks_touching_the_image_border(corner):
    """The image border counts as surface (the bounding-box speed-up must keep that)."""
    shape = (16, 17, 18)
    truth = cube(shape, corner, 4)
    pred = cube(shape, tuple(max(c - 2, 0) if c else 0 for c in corner), 3)
    for mode in M.HD95_MODES:
        expected = brute_hd95(pred, truth, (1.0, 2.0, 1.5), mode)
        assert M.hausdorff95(pred, truth, (1.0, 2.0, 1.5), mode) == pytest.approx(expected)


def test_empty_mask_rules():
    shape = (10, 12, 5)
    empty = np.zeros(shape, bool)
    one = cube(shape, (1, 1, 1), 2)
    assert M.dice(empty, empty) == 1.0
    assert M.hausdorff95(empty, empty) == 0.0
    diagonal = np.sqrt(10**2 + 12**2 + (5 * 2.5) ** 2)
    for pred, truth in [(one, empty), (empty, one)]:
        assert M.dice(pred, truth) == 0.0
        assert M.hausdorff95(pred, truth, (1, 1, 2.5)) == pytest.approx(diagonal)


def test_brats_image_diagonal():
    assert M.image_diagonal_mm(C.BRATS_SHAPE) == pytest.approx(373.13, abs=0.005)
    empty = np.zeros(C.BRATS_SHAPE, bool)
    one = empty.copy()
    one[100, 100, 70] = True
    assert M.hausdorff95(one, empty) == pytest.approx(373.13, abs=0.005)


def test_sensitivity_specificity_volumes():
    truth = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (3, 2, 2), 4)  # TP 48, FN 16, FP 16, TN 920
    m = M.region_metrics(pred, truth, spacing=(1.0, 1.0, 2.5))
    assert m["sensitivity"] == pytest.approx(48 / 64)
    assert m["specificity"] == pytest.approx(920 / 936)
    assert m["pred_volume_ml"] == pytest.approx(64 * 2.5 / 1000)
    assert m["true_volume_ml"] == pytest.approx(64 * 2.5 / 1000)
    assert m["dice"] == pytest.approx(0.75)
    assert m["hd95"] == pytest.approx(1.0)
    assert set(m) == set(M.METRICS)
    empty = np.zeros_like(truth)
    assert M.region_metrics(empty, empty)["sensitivity"] == 1.0
    assert M.region_metrics(empty, truth)["sensitivity"] == 0.0
    assert M.region_metrics(truth, empty)["specificity"] == pytest.approx(936 / 1000)


def test_metric_argument_checks():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\) and \(4, 4, 3\)"):
        M.dice(a, a[..., :3])
    with pytest.raises(ValueError, match=r"\(1, -1, 1\)"):
        M.hausdorff95(a, a, (1, -1, 1))
    with pytest.raises(ValueError, match="'mean'"):
        M.hausdorff95(a, a, mode="mean")


@pytest.mark.parametrize("et_label", [C.LABEL_ET, C.LABEL_ET_2023])
def test_case_metrics_from_label_maps(et_label):
    shape = (10, 10, 10)
    truth = np.zeros(shape, np.uint8)
    truth[cube(shape, (2, 2, 2), 6)] = C.LABEL_ED
    truth[cube(shape, (3, 3, 3), 4)] = C.LABEL_NCR_NET
    truth[cube(shape, (4, 4, 4), 2)] = et_label
    pred = np.zeros(shape, np.uint8)
    pred[cube(shape, (2, 2, 2), 6)] = C.LABEL_ED  # WT exact
    pred[cube(shape, (3, 3, 3), 4)] = et_label  # TC exact, ET = all of TC
    m = M.case_metrics(pred, truth, (1, 1, 1), et_label=et_label)
    assert list(m) == list(C.REGIONS)
    assert m["WT"]["dice"] == 1.0 and m["WT"]["hd95"] == 0.0
    assert m["TC"]["dice"] == 1.0
    assert m["ET"]["dice"] == pytest.approx(2 * 8 / (64 + 8))
    assert m["ET"]["pred_volume_ml"] == pytest.approx(0.064)
    assert m["ET"]["true_volume_ml"] == pytest.approx(0.008)
    assert m["WT"]["true_volume_ml"] == pytest.approx(0.216)


def test_summarize_statistics():
    dices = [0.2, 0.4, 0.6, 1.0]
    per_case = {f"case{i}": {"ET": {"dice": d, "hd95": 2.0 * i}} for i, d in enumerate(dices)}
    s = M.summarize(per_case)["ET"]["dice"]
    assert s["mean"] == pytest.approx(0.55)
    assert s["std"] == pytest.approx(np.sqrt(0.35 / 4))  # population std
    assert s["median"] == pytest.approx(0.5)
    assert s["25quantile"] == pytest.approx(0.35)
    assert s["75quantile"] == pytest.approx(0.7)
    assert M.summarize(list(per_case.values()))["ET"]["hd95"]["median"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least one case"):
        M.summarize([])


# ----------------------------------------------------------------- RegionDice
def numpy_region_dice(y_true, y_pred, channel, threshold=0.5):
    scores = []
    for t, p in zip(y_true[..., channel] > 0.5, y_pred[..., channel] > threshold):
        denom = t.sum() + p.sum()
        scores.append(1.0 if denom == 0 else 2 * (t & p).sum() / denom)
    return np.array(scores)


@pytest.mark.parametrize("region", C.REGIONS)
def test_region_dice_matches_numpy(region):
    rng = np.random.default_rng(9)
    c = C.REGIONS.index(region)
    y_true = (rng.random((3, 4, 5, 6, 3)) < 0.3).astype(np.float32)
    y_pred = rng.random((3, 4, 5, 6, 3)).astype(np.float32)
    y_true[1, ..., c] = 0  # example 1: both empty -> Dice 1
    y_pred[1, ..., c] = 0.2
    y_true[2, ..., c] = 0  # example 2: prediction only -> Dice 0
    metric = M.RegionDice(region)
    update = tf.function(metric.update_state)  # graph-safe
    update(tf.constant(y_true), tf.constant(y_pred, tf.float16))
    expected = numpy_region_dice(y_true, y_pred, c)
    assert expected[1] == 1.0 and expected[2] == 0.0
    assert float(metric.result()) == pytest.approx(expected.mean(), abs=1e-6)
    # accumulates over batches; weights examples
    update(tf.constant(y_true[:1]), tf.constant(y_pred[:1]))
    both = np.concatenate([expected, expected[:1]])
    assert float(metric.result()) == pytest.approx(both.mean(), abs=1e-6)
    metric.reset_state()
    metric.update_state(y_true, y_pred, sample_weight=np.array([1.0, 0.0, 3.0]))
    assert float(metric.result()) == pytest.approx((expected[0] + 3 * expected[2]) / 4, abs=1e-6)
    assert metric.result().dtype == tf.float32


def test_region_dice_config_round_trip_and_checks():
    metric = M.RegionDice("TC", threshold=0.4)
    clone = M.RegionDice.from_config(metric.get_config())
    assert (clone.region, clone.threshold, clone.name) == ("TC", 0.4, "dice_TC")
    with pytest.raises(ValueError, match="'NET'"):
        M.RegionDice("NET")
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\), got 1.0"):
        M.RegionDice("ET", threshold=1.0)


def test_region_dice_in_compiled_keras_training():
    """RegionDice works as a compiled metric (traced in Keras's train and test steps)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4, 4, 4, 4)), keras.layers.Conv3D(3, 1, activation="sigmoid")]
    )
    model.compile(
        optimizer="adam", loss="binary_crossentropy", metrics=[M.RegionDice(r) for r in C.REGIONS]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 4, 4)).astype(np.float32)
    y = (rng.random((2, 4, 4, 4, 3)) < 0.4).astype(np.float32)
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert {f"dice_{r}" for r in C.REGIONS} <= set(history.history)
    logs = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    probs = model.predict(x, verbose=0)
    for c, region in enumerate(C.REGIONS):
        expected = numpy_region_dice(y, probs, c).mean()
        assert logs[f"dice_{region}"] == pytest.approx(expected, abs=1e-6)
