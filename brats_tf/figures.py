"""Per-case PNG figures: T1ce with the ground truth and the prediction overlaid (paper Fig. 2).

One RGB image per case, a grid of 2 rows x 3 columns (1 row without labels):

    row 0 "GROUND TRUTH":  axial | sagittal | coronal
    row 1 "PREDICTION":    axial | sagittal | coronal

each panel a slice of T1ce (grey, 1st-99th percentile of the brain's non-zero
voxels mapped to 0-255) through the tumour's centre of mass (the WT of the
ground truth; of the prediction when there is no ground truth; the volume's
centre when both are empty), the label map blended over it. A legend strip
names the colours (``LABEL_COLOURS``): NCR/NET (1) red, ED (2) green, ET (4,
or 3 in BraTS 2023) yellow.

Orientation (``display_slices``): the volume is first reoriented to RAS+ with
its affine (nibabel ``io_orientation``), then shown in the RADIOLOGICAL
convention of ITK-SNAP and of the BraTS figures: superior (axial: anterior) at
the top, the patient's right on the image's left; sagittal slices show
anterior on the left. So the brain looks upright whatever the storage order
(BraTS files are stored LPS-like, affine diag(-1, -1, 1)).

Layouts: volumes are [D, H, W] (nibabel i, j, k axes), images [rows, cols, 3] uint8.
"""

from __future__ import annotations

import math
import pathlib
import struct
import zlib

import numpy as np

from brats_tf.bitmap_font import GLYPH_H, GLYPH_W, draw_text
from data_pipeline import constants
from data_pipeline.io_utils import atomic_path

# RGB of each label value in the overlay.
LABEL_COLOURS = {
    constants.LABEL_NCR_NET: (255, 0, 0),  # red: necrotic / non-enhancing core
    constants.LABEL_ED: (0, 255, 0),  # green: edema
    constants.LABEL_ET: (255, 255, 0),  # yellow: enhancing tumour
}
LEGEND = (
    ("NCR/NET", constants.LABEL_NCR_NET),
    ("ED", constants.LABEL_ED),
    ("ET", constants.LABEL_ET),
)
VIEWS = ("AXIAL", "SAGITTAL", "CORONAL")
ROW_TITLES = ("GROUND TRUTH", "PREDICTION")
DEFAULT_ALPHA = 0.5
MIN_PANEL = 200  # pixels: small volumes are enlarged (nearest neighbour) to at least this


def _check_volume(name: str, volume, ndim: int = 3) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != ndim:
        raise ValueError(f"{name} must be a [D, H, W] volume, got shape {volume.shape}")
    return volume


def to_ras(volume: np.ndarray, affine) -> np.ndarray:
    """``volume`` [D, H, W] reoriented (flips / axis swaps only) so its axes point R, A, S."""
    import nibabel as nib

    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(volume, ornt)


def display_slices(volume_ras: np.ndarray, centre) -> dict[str, np.ndarray]:
    """The three 2-D views of a RAS+ volume through voxel ``centre`` = (x, y, z), radiological.

    axial = v[:, :, z] with anterior up and right on the left; sagittal = v[x, :, :]
    with superior up and anterior on the left; coronal = v[:, y, :] with superior up
    and right on the left. Each is ``slice.T[::-1, ::-1]``.
    """
    x, y, z = (int(c) for c in centre)
    return {
        "AXIAL": volume_ras[:, :, z].T[::-1, ::-1],
        "SAGITTAL": volume_ras[x, :, :].T[::-1, ::-1],
        "CORONAL": volume_ras[:, y, :].T[::-1, ::-1],
    }


def tumour_centre(*label_maps) -> tuple[int, int, int]:
    """Rounded centre of mass of the first non-empty label map's tumour (any label > 0);
    the volume's centre when all are empty."""
    shape = None
    for labels in label_maps:
        if labels is None:
            continue
        labels = np.asarray(labels)
        shape = labels.shape
        if labels.any():
            return tuple(int(round(c)) for c in np.argwhere(labels > 0).mean(axis=0))
    if shape is None:
        raise ValueError("tumour_centre needs at least one label map")
    return tuple(n // 2 for n in shape)


def grey(image: np.ndarray) -> np.ndarray:
    """Intensities -> uint8 grey: the 1st-99th percentile of the non-zero voxels to 0-255."""
    image = np.asarray(image, np.float64)
    values = image[image != 0]
    if values.size == 0:
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(values, [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip(np.rint((image - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def overlay(
    grey_image: np.ndarray,
    labels: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    et_label: int = constants.LABEL_ET,
) -> np.ndarray:
    """RGB [rows, cols, 3] uint8: ``grey_image`` with each label's colour blended in.

    Where label v > 0: rgb = round((1 - alpha) * grey + alpha * LABEL_COLOURS[v]);
    elsewhere the grey value in all three channels. ``et_label`` 3 (BraTS 2023)
    is drawn in ET's colour.
    """
    grey_image, labels = np.asarray(grey_image), np.asarray(labels)
    if grey_image.shape != labels.shape or grey_image.ndim != 2:
        raise ValueError(
            f"grey image and labels must be 2-D of one shape, got "
            f"{grey_image.shape} and {labels.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    rgb = np.repeat(grey_image.astype(np.float64)[..., None], 3, axis=-1)
    colours = dict(LABEL_COLOURS)
    colours[et_label] = LABEL_COLOURS[constants.LABEL_ET]
    for value, colour in colours.items():
        mask = labels == value
        rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(colour, np.float64)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def case_figure(
    t1ce: np.ndarray,
    affine,
    truth: np.ndarray | None,
    prediction: np.ndarray,
    et_label: int = constants.LABEL_ET,
    alpha: float = DEFAULT_ALPHA,
    title: str = "",
) -> np.ndarray:
    """The module docstring's figure as an RGB array [rows, cols, 3] uint8.

    Args:
      t1ce: [D, H, W] raw T1ce intensities (original grid).
      affine: the 4x4 voxel-to-world affine of the volumes.
      truth: [D, H, W] ground-truth label map, or None (prediction only).
      prediction: [D, H, W] predicted label map (0, 1, 2, ``et_label``).
    """
    t1ce = _check_volume("t1ce", t1ce)
    prediction = _check_volume("prediction", prediction)
    maps = [("PREDICTION", prediction)]
    if truth is not None:
        truth = _check_volume("truth", truth)
        maps.insert(0, ("GROUND TRUTH", truth))
    for name, labels in maps:
        if labels.shape != t1ce.shape:
            raise ValueError(f"{name.lower()} shape {labels.shape} != t1ce shape {t1ce.shape}")
    t1_ras = to_ras(grey(t1ce), affine)
    ras_maps = [(name, to_ras(labels, affine)) for name, labels in maps]
    centre = tumour_centre(*(labels for _, labels in ras_maps))
    grey_views = display_slices(t1_ras, centre)
    side = max(t1_ras.shape)
    scale = max(1, math.ceil(MIN_PANEL / side))
    panel = side * scale
    gap, header = 4, GLYPH_H + 8
    legend_h = GLYPH_H + 12
    rows = len(ras_maps)
    height = header + rows * (header + panel + gap) + legend_h
    width = 3 * panel + 4 * gap
    canvas = np.zeros((height, width, 3), np.uint8)
    for c, view in enumerate(VIEWS):  # column captions: view and slice index
        index = {"AXIAL": centre[2], "SAGITTAL": centre[0], "CORONAL": centre[1]}[view]
        text = f"{view} {index}"
        draw_text(canvas, text, 4, gap + c * (panel + gap) + (panel - len(text) * GLYPH_W) // 2)
    for r, (name, labels) in enumerate(ras_maps):
        top = header + r * (header + panel + gap)
        draw_text(canvas, name, top + 4, gap)
        label_views = display_slices(labels, centre)
        for c, view in enumerate(VIEWS):
            rgb = overlay(grey_views[view], label_views[view], alpha, et_label)
            rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
            y0 = top + header + (panel - rgb.shape[0]) // 2
            x0 = gap + c * (panel + gap) + (panel - rgb.shape[1]) // 2
            canvas[y0 : y0 + rgb.shape[0], x0 : x0 + rgb.shape[1]] = rgb
    _draw_legend(canvas, height - legend_h + 6, gap, et_label, title)
    return canvas


def _draw_legend(canvas: np.ndarray, y: int, gap: int, et_label: int, title: str) -> None:
    """A colour swatch and the name of each label in a row from ``y``; the
    title (the case id) right-aligned where it fits."""
    x, width = gap, canvas.shape[1]
    for name, value in LEGEND:
        shown = et_label if value == constants.LABEL_ET else value
        canvas[y : y + GLYPH_H, x : x + GLYPH_H] = LABEL_COLOURS[value]
        text = f"{name} ({shown})"
        draw_text(canvas, text, y, x + GLYPH_H + 6)
        x += GLYPH_H + 6 + (len(text) + 2) * GLYPH_W
    if title and x + len(title) * GLYPH_W < width:
        draw_text(canvas, title, y, width - gap - len(title) * GLYPH_W)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB [rows, cols, 3] uint8 array: 8-bit truecolour, no
    interlace, every row unfiltered, zlib-compressed (the PNG specification;
    no TensorFlow, so a figure costs no TensorFlow start)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected [rows, cols, 3] uint8, got {rgb.shape} {rgb.dtype}")
    rows, cols, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0)  # depth 8, RGB
    scanlines = np.concatenate([np.zeros((rows, 1), np.uint8), rgb.reshape(rows, -1)], axis=1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_png(rgb: np.ndarray, path) -> pathlib.Path:
    """Writes ``rgb`` as a PNG under a temporary name, then renames it to ``path``
    (``io_utils.atomic_path``)."""
    path = pathlib.Path(path)
    data = encode_png(rgb)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


# ------------------------------------------------------------ line charts
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def _line(canvas: np.ndarray, x0, y0, x1, y1, colour) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    for dy in (0, 1):  # two pixels thick
        canvas[np.clip(ys + dy, 0, canvas.shape[0] - 1), np.clip(xs, 0, canvas.shape[1] - 1)] = (
            colour
        )


def line_panels(
    panels,
    x_label: str = "STEP",
    cols: int = 4,
    width: int = 400,
    height: int = 230,
    legend: list[str] | None = None,
) -> np.ndarray:
    """An RGB image of line charts, one panel per entry of ``panels``.

    Args:
      panels: [(title, [(name, x, y), ...][, (y_min, y_max)])] (without a
        range: the values' own): each series a line with a dot
        per point, coloured by its position in the panel (SERIES_COLOURS);
        non-finite values are left out. The series' names are listed under
        the title in their colours; the y range is written inside the axes.
      x_label: the x axis' caption, written with its largest value.
      legend: lines of text below the panels (e.g. the series' meaning).
    """
    margin, rows = 30, -(-len(panels) // cols)
    extra = 22 * len(legend or [])
    canvas = np.full((rows * height + extra + 8, cols * width, 3), 255, np.uint8)
    for k, (title, series, *y_range) in enumerate(panels):
        top, left = (k // cols) * height, (k % cols) * width
        arrays = [(name, np.asarray(x, float), np.asarray(y, float)) for name, x, y in series]
        values = np.concatenate([y[np.isfinite(y)] for _, _, y in arrays] + [np.zeros(0)])
        xs = np.concatenate([x for _, x, _ in arrays] + [np.zeros(0)])
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 1.0)
        if y_range:
            lo, hi = y_range[0]
        hi = hi if hi > lo else lo + 1.0
        x_max = xs.max() if xs.size and xs.max() > 0 else 1.0
        x0, x1 = left + margin, left + width - 10
        y0, y1 = top + height - margin, top + margin + 18
        canvas[y1 : y0 + 1, [x0, x1]] = 0
        canvas[[y1, y0], x0 : x1 + 1] = 0
        draw_text(canvas, title, top + 4, left + margin, (0, 0, 0))
        draw_text(canvas, f"{hi:.3g}", y1 + 4, x0 + 4, (96, 96, 96))
        draw_text(canvas, f"{lo:.3g}", y0 - 18, x0 + 4, (96, 96, 96))
        cursor = left + margin
        for (name, _, _), colour in zip(arrays, SERIES_COLOURS):
            draw_text(canvas, name, top + 22, cursor, colour)
            cursor += GLYPH_W * (len(name) + 1)
        draw_text(canvas, f"{x_label} {x_max:.4g}", y0 + 8, x1 - 150, (0, 0, 0))
        for (_, x, y), colour in zip(arrays, SERIES_COLOURS):
            px = x0 + (x1 - x0) * x / x_max
            py = y0 - (y0 - y1) * (y - lo) / (hi - lo)
            ok = np.isfinite(py)
            points = list(zip(px[ok], py[ok]))
            for (a, b), (c, d) in zip(points, points[1:]):
                _line(canvas, a, b, c, d, colour)
            for a, b in points:
                canvas[max(int(b) - 2, 0) : int(b) + 3, max(int(a) - 2, 0) : int(a) + 3] = colour
    for n, text in enumerate(legend or []):
        draw_text(canvas, text, rows * height + 6 + 22 * n, 20, (0, 0, 0))
    return canvas


def training_curves(history: list[dict], title: str = "") -> np.ndarray:
    """train.py's history.json as an RGB image, x the epoch: the loss and its
    terms, the training Dice per region (on the epoch's crops), and the
    held-out Dice per region where the run validated (--validate_every)."""
    epochs = [h["epoch"] for h in history]

    def series(keys_names):
        return [
            (name, [h["epoch"] for h in history if key in h], [h[key] for h in history if key in h])
            for key, name in keys_names
            if any(key in h for h in history)
        ]

    panels = [
        ("LOSS", series([("loss", "TOTAL"), ("dice", "DICE"), ("l2", "L2"), ("kl", "KL")])),
        ("TRAINING DICE", series([(f"dice_{r}", r) for r in constants.REGIONS]), (0.0, 1.0)),
    ]
    held_out = series([(f"val_dice_{r}", r) for r in constants.REGIONS])
    if held_out:
        panels.append(("HELD-OUT DICE", held_out, (0.0, 1.0)))
    seconds = [h.get("seconds", float("nan")) for h in history]
    panels.append(("SECONDS PER EPOCH", [("TRAINING", epochs, seconds)]))
    return line_panels(
        panels, x_label="EPOCH", cols=len(panels), legend=[title.upper()] if title else None
    )


TRAINING_CURVES_PNG = "curves.png"


def write_training_curves(model_dir) -> pathlib.Path:
    """<model_dir>/curves.png (``training_curves``) from <model_dir>/history.json."""
    import json

    model_dir = pathlib.Path(model_dir)
    with open(model_dir / "history.json") as f:
        history = json.load(f)
    return write_png(
        training_curves(history, title=f"{model_dir.name}: history.json"),
        model_dir / TRAINING_CURVES_PNG,
    )
