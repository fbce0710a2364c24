"""NumPy volume functions: boxes of non-zero voxels, pasting a crop back,
normalisation over non-zero voxels, label maps to regions, and the checks of
their arguments (padding ones included).

The one place each of these is defined: the converter (``data_pipeline``),
inference, metrics and evaluation use them. The graph versions that run in
the SavedModel (``inference.pad_to_multiple_tf``, ``brain_box_tf``,
``normalize_nonzero_tf``) and in the input pipeline
(``data_pipeline.augment.labels_to_regions``) follow the same conventions and
are tested against these (the padding against the NumPy reference of
tests/oracles.py). This module imports only NumPy,
``data_pipeline.constants`` and ``data_pipeline.checks``.

Paper references: §1 (labels, nested regions WT/TC/ET),
§3.7 (per-channel normalisation over non-zero voxels), §3.1 (spatial
sizes divisible by 8: pad 240x240x155 to 240x240x160 and crop back).

Layouts: a single case is [D, H, W, C] (D, H, W = the nibabel array axes,
C = 4 modalities in ``constants.MODALITIES`` order); a batch is [B, D, H, W, C];
a label map is [D, H, W].

Conventions:

* Padding: zeros, split symmetrically, the odd voxel at the END
  (before = total // 2, after = total - before; 155 -> 160 pads 2 before and 3
  after). Zero is the background value after ``normalize_nonzero``. ``mode="end"``
  pads only at the end.
* A box is given by its start and its size (``brain_box``) or its start and
  stop (``nonzero_box``) per spatial axis, in voxels of the original grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline import constants
from data_pipeline.checks import positive_int

PAD_MODES = ("symmetric", "end")
ET_LABELS = (constants.LABEL_ET, constants.LABEL_ET_2023)


# ------------------------------------------------------------------ checks
def check_multiple(multiple) -> int:
    """A positive integer, Python's or NumPy's (the size spatial axes are
    padded to a multiple of), as an int; else ValueError."""
    if isinstance(multiple, np.integer):
        multiple = int(multiple)
    return positive_int("multiple", multiple)


def check_pad_mode(mode: str, name: str = "mode") -> str:
    """One of ``PAD_MODES``; else ValueError naming the argument ``name``."""
    if mode not in PAD_MODES:
        raise ValueError(f"{name} must be one of {PAD_MODES}, got {mode!r}")
    return mode


def check_margin(margin) -> int:
    """An integer >= 0 (voxels around a box); else ValueError."""
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be an integer >= 0, got {margin!r}")
    return int(margin)


def check_et_label(et_label) -> int:
    """The ET label value: 4 (BraTS 2017-2021) or 3 (BraTS 2023+); else ValueError."""
    if et_label not in ET_LABELS:
        raise ValueError(
            f"et_label must be {constants.LABEL_ET} (BraTS 2017-2021) or "
            f"{constants.LABEL_ET_2023} (BraTS 2023+), got {et_label!r}"
        )
    return int(et_label)


def check_threshold(threshold) -> float:
    """A region threshold in [0, 1); else ValueError quoting it."""
    try:
        ok = 0.0 <= float(threshold) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    return float(threshold)


def check_et_min_voxels(et_min_voxels) -> int:
    """The post-processing's ET volume threshold, an integer >= 0 (0: off); else
    ValueError quoting it."""
    if (
        isinstance(et_min_voxels, bool)
        or not isinstance(et_min_voxels, (int, np.integer))
        or et_min_voxels < 0
    ):
        raise ValueError(
            f"et_min_voxels must be an integer >= 0 (0: no post-processing), got {et_min_voxels!r}"
        )
    return int(et_min_voxels)


def check_raw_image(image: np.ndarray) -> None:
    """ValueError unless ``image`` is real-valued and finite."""
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"expected a real-valued image, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values")


# ------------------------------------------------------------------- boxes
def _nonzero_extent(mask: np.ndarray):
    """(start, stop) per axis of the bounding box of a 3-D boolean mask's
    voxels; None when it has none."""
    if not mask.any():
        return None
    start, stop = [], []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(int(hits[0]))
        stop.append(int(hits[-1]) + 1)
    return tuple(start), tuple(stop)


def nonzero_box(arrays) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box (start, stop) of the voxels non-zero in any of the 3-D arrays,
    or the whole grid's first voxel (a 1-voxel box) when all are zero.

    The converter stores each case cropped to this box (lossless for
    skull-stripped data); ``paste_crop`` puts a crop back."""
    mask = np.zeros(arrays[0].shape[:3], dtype=bool)
    for a in arrays:
        mask |= a != 0
    extent = _nonzero_extent(mask)
    return extent if extent is not None else ((0, 0, 0), (1, 1, 1))


def brain_box(
    image: np.ndarray, multiple: int = constants.SPATIAL_DIVISOR, margin: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box the network runs on when inference crops to the brain.

    BraTS images are skull-stripped: outside the brain every modality is 0,
    and nothing there can be tumour. The box is the bounding box of the voxels
    that are non-zero in any channel, grown by ``margin`` voxels on each side,
    then grown (centred, shifted to stay inside the volume) to a multiple of
    ``multiple`` where the volume allows; an axis that cannot hold the
    rounded size keeps its full length (the padding to a multiple pads it). An
    all-zero image gives the whole volume. 240 x 240 x 155 BraTS cases give
    about 144 x 176 x 144: 2.6x fewer voxels than 240 x 240 x 160.

    Args:
      image: [D, H, W, C] (or [D, H, W]) array.
    Returns:
      (start, size): per spatial axis; the box is ``image[start:start + size]``.
    """
    multiple = check_multiple(multiple)
    check_margin(margin)
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be [D, H, W] or [D, H, W, C], got shape {image.shape}")
    mask = image != 0
    if image.ndim == 4:
        mask = mask.any(axis=-1)
    extent = _nonzero_extent(mask)
    start, size = [], []
    for axis, n in enumerate(mask.shape):
        if extent is None:
            lo, hi = 0, n
        else:
            lo, hi = max(extent[0][axis] - margin, 0), min(extent[1][axis] + margin, n)
        want = min(-(-(hi - lo) // multiple) * multiple, n)
        begin = min(max(lo - (want - (hi - lo)) // 2, 0), n - want)
        start.append(begin)
        size.append(want)
    return tuple(start), tuple(size)


def paste_crop(
    sub_volume: np.ndarray, full_shape: Sequence[int], start: Sequence[int], fill=0
) -> np.ndarray:
    """Pastes a crop (or a prediction made on it) back into the original grid.

    Args:
      sub_volume: [d, h, w, ...] array (image, labels or probabilities) of the
        crop ``original[start[0]:start[0]+d, start[1]:start[1]+h, start[2]:start[2]+w]``.
      full_shape: (D, H, W) of the original volume.
      start: the crop's bounding-box offsets (i, j, k) in the original grid
        (e.g. a TFRecord example's ``box_start``).
      fill: the value outside the box (0 = background).
    Returns: [D, H, W, ...] array of ``sub_volume``'s dtype.
    """
    sub_volume = np.asarray(sub_volume)
    full_shape, start = tuple(int(n) for n in full_shape), tuple(int(s) for s in start)
    if len(full_shape) != 3 or len(start) != 3 or sub_volume.ndim < 3:
        raise ValueError(
            f"need a [d, h, w, ...] sub-volume, a (D, H, W) shape and (i, j, k) offsets; got "
            f"shapes {sub_volume.shape}, {full_shape} and start {start}"
        )
    end = tuple(s + n for s, n in zip(start, sub_volume.shape[:3]))
    if any(s < 0 for s in start) or any(e > n for e, n in zip(end, full_shape)):
        raise ValueError(
            f"box start {start} + size {sub_volume.shape[:3]} does not fit in {full_shape}"
        )
    full = np.full(full_shape + sub_volume.shape[3:], fill, dtype=sub_volume.dtype)
    full[start[0] : end[0], start[1] : end[1], start[2] : end[2]] = sub_volume
    return full


# ----------------------------------------------------------- normalisation
def nonzero_stats(image) -> tuple[np.ndarray, np.ndarray]:
    """Per channel mean and population std (ddof=0) over the non-zero voxels of
    [..., C], float64 [C] each (§3.7; the converter stores them per case).

    A channel without non-zero voxels gets mean 0, std 1 (normalisation is then
    the identity on its zeros); a constant one std 0."""
    image = np.asarray(image)
    flat = image.reshape(-1, image.shape[-1])
    means, stds = [], []
    for c in range(flat.shape[-1]):
        values = flat[:, c][flat[:, c] != 0].astype(np.float64)
        means.append(values.mean() if values.size else 0.0)
        stds.append(values.std() if values.size else 1.0)
    return np.array(means), np.array(stds)


def normalize_nonzero(image: np.ndarray) -> np.ndarray:
    """Per channel zero mean / unit std over that channel's NON-ZERO voxels (§3.7).

    The semantics of MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``:
    for each channel (and each example of a batch) the mean and the population
    std (ddof=0) are computed over the voxels where that channel is non-zero
    (``nonzero_stats``, in float64); those voxels become (x - mean) / std,
    zero voxels stay exactly 0. A channel with a constant non-zero part (std 0)
    is only shifted (divided by 1); an all-zero channel stays all zero.

    Args:
      image: [D, H, W, C] or [B, D, H, W, C], channels last, raw intensities.
    Returns: float32 array of the same shape (a new array; the input is untouched).
    """
    image = np.asarray(image)
    if image.ndim not in (4, 5):
        raise ValueError(f"expected [D, H, W, C] or [B, D, H, W, C], got shape {image.shape}")
    check_raw_image(image)
    out = np.empty(image.shape, np.float32)
    for index in np.ndindex(image.shape[:-4]):  # each example ((): the single case)
        case = image[index]
        mean, std = nonzero_stats(case)
        x = case.astype(np.float64)
        out[index] = np.where(x != 0, (x - mean) / np.where(std > 0, std, 1.0), 0.0)
    return out


# ------------------------------------------------------------------ labels
def region_labels(et_label: int = constants.LABEL_ET) -> tuple[tuple[int, ...], ...]:
    """The label values of each region, in ``constants.REGIONS`` order (WT, TC,
    ET), ET written as ``et_label`` (4; 3 for BraTS 2023)."""
    et_label = check_et_label(et_label)
    return tuple(
        tuple(et_label if v == constants.LABEL_ET else v for v in constants.REGION_LABELS[region])
        for region in constants.REGIONS
    )


def labels_to_regions(label_map: np.ndarray, et_label: int = constants.LABEL_ET) -> np.ndarray:
    """BraTS label map [...] -> boolean region masks [..., 3] (WT, TC, ET) (§1).

    WT = {1, 2, ET}, TC = {1, ET}, ET = {ET} with ET = ``et_label`` (4; 3 for
    BraTS 2023). Any other value (e.g. a 3 in a BraTS 2018 map) is an error.
    """
    et_label = check_et_label(et_label)
    label_map = np.asarray(label_map)
    if not np.issubdtype(label_map.dtype, np.integer):
        rounded = np.rint(label_map)
        if not np.issubdtype(label_map.dtype, np.floating) or np.any(rounded != label_map):
            raise ValueError(f"label map must hold integers, got dtype {label_map.dtype}")
        label_map = rounded.astype(np.int64)
    allowed = {constants.LABEL_BACKGROUND, constants.LABEL_NCR_NET, constants.LABEL_ED, et_label}
    found = set(np.unique(label_map).tolist())
    if not found <= allowed:
        raise ValueError(
            f"label map has values {sorted(found - allowed)} outside {sorted(allowed)} "
            f"(et_label={et_label})"
        )
    return np.stack([np.isin(label_map, values) for values in region_labels(et_label)], axis=-1)


def describe_et_to_necrosis(et_min_voxels: int) -> str:
    """``et_to_necrosis`` with ``et_min_voxels`` in words, as protocols record it."""
    et_min_voxels = check_et_min_voxels(et_min_voxels)
    return f"ET below {et_min_voxels} voxels -> necrosis (label 1)" if et_min_voxels else "none"


def et_to_necrosis(
    label_map: np.ndarray, et_min_voxels: int, et_label: int = constants.LABEL_ET
) -> np.ndarray:
    """BraTS post-processing (not the paper's; off at 0): when a case's predicted
    ET has fewer than ``et_min_voxels`` voxels, its ET voxels become necrosis
    (label 1). They stay in TC and WT; only ET becomes empty, which the BraTS
    rules score 1 on a case without ET, where a few false ET voxels score 0.

    label_map: one case [D, H, W] (0, 1, 2, ``et_label``). Returns a new uint8 map.
    """
    et_min_voxels, et_label = check_et_min_voxels(et_min_voxels), check_et_label(et_label)
    labels = np.array(label_map, dtype=np.uint8)
    if labels.ndim != 3:
        raise ValueError(f"label map must be one case [D, H, W], got shape {labels.shape}")
    et = labels == et_label
    if np.count_nonzero(et) < et_min_voxels:
        labels[et] = constants.LABEL_NCR_NET
    return labels
