"""Figures: overlay colours exactly where hand-made masks are, orientation, layout, PNG."""

import stat

import numpy as np
import pytest
import tensorflow as tf

from brats_tf import figures
from data_pipeline import io_utils

RED, GREEN, YELLOW = (255, 0, 0), (0, 255, 0), (255, 255, 0)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("et_label", [4, 3])
def test_overlay_colours_exactly_on_the_masks(alpha, et_label):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(6, 7)).astype(np.uint8)
    labels = np.zeros((6, 7), np.uint8)
    labels[1, 2] = 1
    labels[3, 0:2] = 2
    labels[5, 6] = et_label
    rgb = figures.overlay(grey, labels, alpha=alpha, et_label=et_label)
    assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8
    expected = np.repeat(grey[..., None], 3, axis=-1).astype(np.float64)
    for (r, c), colour in [((1, 2), RED), ((3, 0), GREEN), ((3, 1), GREEN), ((5, 6), YELLOW)]:
        expected[r, c] = (1 - alpha) * grey[r, c] + alpha * np.array(colour)
    np.testing.assert_array_equal(rgb, np.rint(expected).astype(np.uint8))


def test_overlay_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        figures.overlay(np.zeros((2, 2), np.uint8), np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="one shape"):
        figures.overlay(np.zeros((2, 2), np.uint8), np.zeros((2, 3)))


# A RAS volume (x right, y anterior, z superior) with one marked voxel: where it lands in
# the radiological views (superior / anterior up, patient's right on the left).
@pytest.mark.parametrize(
    "voxel,expected",
    [
        # right-anterior-superior corner: top-left in every view
        ((4, 5, 6), {"AXIAL": (0, 0), "SAGITTAL": (0, 0), "CORONAL": (0, 0)}),
        # left-posterior-inferior corner: bottom-right
        ((0, 0, 0), {"AXIAL": (5, 4), "SAGITTAL": (6, 5), "CORONAL": (6, 4)}),
        # right, posterior, superior
        ((4, 0, 6), {"AXIAL": (5, 0), "SAGITTAL": (0, 5), "CORONAL": (0, 0)}),
    ],
)
def test_display_slices_orientation(voxel, expected):
    volume = np.zeros((5, 6, 7), np.uint8)  # X, Y, Z
    volume[voxel] = 1
    views = figures.display_slices(volume, voxel)
    assert views["AXIAL"].shape == (6, 5)  # rows: y (A at top), cols: x (R at left)
    assert views["SAGITTAL"].shape == (7, 6)  # rows: z (S at top), cols: y (A at left)
    assert views["CORONAL"].shape == (7, 5)  # rows: z, cols: x (R at left)
    for view, position in expected.items():
        assert np.argwhere(views[view]).tolist() == [list(position)], view


@pytest.mark.parametrize(
    "diag,expected",
    [
        ((1, 1, 1), (0, 0, 0)),  # already RAS
        ((-1, -1, 1), (4, 5, 0)),  # BraTS files: i grows to the left, j to the back
        ((1, 1, -1), (0, 0, 6)),
    ],
)
def test_to_ras(diag, expected):
    volume = np.zeros((5, 6, 7), np.uint8)
    volume[0, 0, 0] = 1
    ras = figures.to_ras(volume, np.diag(list(diag) + [1.0]))
    assert tuple(np.argwhere(ras)[0]) == expected


def test_tumour_centre():
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros_like(a)
    b[2:5, 6:9, 0:2] = 2
    assert figures.tumour_centre(None, a) == (5, 5, 5)  # all empty: the volume's centre
    assert figures.tumour_centre(a, b) == (3, 7, 0)  # round(0.5) == 0: numpy's half to even
    assert figures.tumour_centre(b, None) == (3, 7, 0)


def test_case_figure_places_colours_where_the_masks_are():
    """Black T1ce, a truth cube of NCR/NET and a predicted cube of ED: the blended colours
    appear exactly as 4x4 voxel squares (x5 px) in the right row, in all three views."""
    shape = (48, 48, 40)
    truth = np.zeros(shape, np.uint8)
    truth[20:24, 20:24, 18:22] = 1
    prediction = np.zeros(shape, np.uint8)
    prediction[21:25, 19:23, 17:21] = 2
    rgb = figures.case_figure(np.zeros(shape), np.eye(4), truth, prediction, alpha=0.5)
    assert rgb.shape == (22 + 2 * (22 + 240 + 4) + 26, 3 * 240 + 16, 3)
    half_red, half_green = np.array([128, 0, 0]), np.array([0, 128, 0])
    red = np.all(rgb == half_red, axis=-1)
    green = np.all(rgb == half_green, axis=-1)
    assert red.sum() == green.sum() == 3 * 20 * 20
    truth_rows = (22 + 22, 22 + 22 + 240)
    pred_rows = (22 + 266 + 22, 22 + 266 + 22 + 240)
    for mask, (lo, hi) in [(red, truth_rows), (green, pred_rows)]:
        rows, cols = np.nonzero(mask)
        assert rows.min() >= lo and rows.max() < hi
        for c in range(3):  # one 20x20 square per view column
            in_col = (cols >= 4 + c * 244) & (cols < 4 + c * 244 + 240)
            r, k = rows[in_col], cols[in_col]
            assert in_col.sum() == 400 and np.ptp(r) == 19 and np.ptp(k) == 19
    # by hand: centre (22, 22, 20) (half to even); axial slice z = 20, truth x, y in 20..23 ->
    # display column 47 - x and row 47 - y in 24..27 -> x5 px, + panel origin (row 44, col 4)
    rows, cols = np.nonzero(red[:, :244])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (164, 183, 124, 143)
    # the legend's swatches hold the full colours
    for colour in (RED, GREEN, YELLOW):
        assert np.all(rgb == np.array(colour), axis=-1).sum() == 14 * 14


def test_case_figure_without_truth_has_one_row():
    shape = (16, 16, 8)
    rgb = figures.case_figure(np.ones(shape), np.eye(4), None, np.zeros(shape, np.uint8))
    assert rgb.shape == (22 + (22 + 208 + 4) + 26, 3 * 208 + 16, 3)  # 16 x 13 = 208 px


@pytest.mark.parametrize("shape", [(9, 11, 3), (1, 1, 3), (3, 300, 3)])
def test_write_png_round_trip(tmp_path, shape):
    """The PNG written without TensorFlow is what TensorFlow's decoder reads."""
    rgb = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    path = figures.write_png(rgb, tmp_path / "a.png")
    np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(str(path))).numpy(), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    # readable as the other outputs are (the temporary file's 0600 is not kept)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~io_utils.umask()


def test_case_figure_is_the_same_for_a_flipped_storage_order():
    """The same head stored LPS-like (BraTS: i and j reversed, affine diag(-1, -1, 1)) gives
    the same picture as when stored RAS: the figure follows the affine, not the array order."""
    rng = np.random.default_rng(0)
    shape = (20, 24, 16)
    t1ce = rng.integers(1, 1000, size=shape).astype(np.float32)
    truth = np.zeros(shape, np.uint8)
    truth[3:9, 14:20, 2:6] = 2
    truth[5:7, 16:18, 3:5] = 4
    prediction = np.roll(truth, 2, axis=0)
    ras = figures.case_figure(t1ce, np.eye(4), truth, prediction)
    lps_affine = np.array([[-1.0, 0, 0, 19], [0, -1.0, 0, 23], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    flip = (slice(None, None, -1), slice(None, None, -1))
    lps = figures.case_figure(t1ce[flip], lps_affine, truth[flip], prediction[flip])
    np.testing.assert_array_equal(lps, ras)
    assert not np.array_equal(
        figures.case_figure(t1ce[flip], np.eye(4), truth[flip], prediction[flip]), ras
    )


def test_line_panels_draw_each_series_in_its_colour_where_its_points_are():
    """Two series in one panel with a fixed y range: each point's dot is in its
    series' colour at the position the axes give it (hand-computed)."""
    width, height, margin = 400, 230, 30
    panels = [("P", [("A", [1, 2], [0.0, 1.0]), ("B", [2], [0.5])], (0.0, 1.0))]
    rgb = figures.line_panels(panels, x_label="EPOCH", cols=1, width=width, height=height)
    assert rgb.shape == (height + 8, width, 3) and rgb.dtype == np.uint8
    x0, x1, y0, y1 = margin, width - 10, height - margin, margin + 18
    a, b = figures.SERIES_COLOURS[:2]
    for x, y, colour in [(1, 0.0, a), (2, 1.0, a), (2, 0.5, b)]:
        px = round(x0 + (x1 - x0) * x / 2)
        py = round(y0 - (y0 - y1) * y)
        assert tuple(rgb[py, px]) == colour, (x, y)


def test_training_curves_from_a_history(tmp_path):
    """train.py's history.json as curves.png: panels for the loss, the training
    Dice, the held-out Dice (only where the run validated) and the epoch time."""
    history = [
        {
            "epoch": e,
            "loss": 2.0 / e,
            "dice": 1.5 / e,
            "l2": 0.4,
            "kl": 0.01,
            "dice_WT": 0.2 * e,
            "dice_TC": 0.1 * e,
            "dice_ET": 0.05 * e,
            "seconds": 10.0,
        }
        for e in (1, 2, 3)
    ]
    history[-1].update(val_dice_WT=0.7, val_dice_TC=0.5, val_dice_ET=0.4)
    (tmp_path / "history.json").write_text(__import__("json").dumps(history))
    path = figures.write_training_curves(tmp_path)
    assert path == tmp_path / figures.TRAINING_CURVES_PNG
    image = tf.io.decode_png(path.read_bytes()).numpy()
    without_validation = figures.training_curves(history[:2])
    assert image.shape[1] == 4 * 400 and without_validation.shape[1] == 3 * 400
