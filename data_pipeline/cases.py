"""Reading and checking one BraTS NIfTI case (the converter's and evaluate.py's way in).

``load_case`` reads a case's four modalities (and its label map, when there
is one), checks them (every file present and readable, 3-D, identical
shapes and affines, finite values, labels in the expected set) and crops
them to the bounding box of their non-zero voxels. Any problem raises
``BadCaseError``, whose text is one line naming the case and the file. An
image with (almost) no zero background is read with a warning: the method
takes its non-zero voxels as the brain.
"""

import dataclasses

import nibabel as nib
import numpy as np
from absl import logging

from data_pipeline import layouts
from data_pipeline.constants import (
    LABEL_BACKGROUND,
    LABEL_ED,
    LABEL_ET,
    LABEL_ET_2023,
    LABEL_NCR_NET,
    LABEL_VALUES,
    MODALITIES,
)
from data_pipeline.volume import nonzero_box

AFFINE_ATOL = 1e-4  # mm; "identical" affines up to header float noise
# A skull-stripped BraTS image is 0 outside the brain (~83% of its 240 x 240 x
# 155 grid); an image with fewer zero voxels than this has likely lost its
# background (e.g. a float image stored as integers with scl_slope/scl_inter,
# or resampled), and the brain box and normalisation would take it as brain.
MIN_BACKGROUND_FRACTION = 0.05
LABELS_2023 = (LABEL_BACKGROUND, LABEL_NCR_NET, LABEL_ED, LABEL_ET_2023)


class BadCaseError(ValueError):
    """A case failed a check; str() is one line naming the case and the file."""

    def __init__(self, case_id, path, problem):
        super().__init__(f"case {case_id}: file {path}: {problem}")
        self.case_id = case_id
        self.path = path


@dataclasses.dataclass
class LoadedCase:
    """A checked case, cropped to the bounding box of its non-zero voxels."""

    case: layouts.Case
    image: np.ndarray  # [d, h, w, 4] int16 or float32, MODALITIES order
    label: np.ndarray | None  # [d, h, w] uint8, LABEL_VALUES
    original_shape: tuple
    affine: np.ndarray
    box_start: tuple
    label_counts: dict | None


def _load_nifti(case_id, path):
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files
        raise BadCaseError(
            case_id, path, f"cannot read NIfTI ({type(e).__name__}: {e})".replace("\n", " ")
        ) from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadCaseError(case_id, path, f"expected a 3-D volume, got shape {data.shape}")
    return data, img.affine


def check_files(case, require_label):
    """Cheap check before any data is read: every file is present."""
    for modality in case.missing:
        path = case.expected_path(modality)
        raise BadCaseError(case.case_id, path, f"missing {modality} file")
    if require_label and case.label is None:
        raise BadCaseError(
            case.case_id,
            case.expected_path(layouts.LABEL_SUFFIX),
            "missing label file (other cases of this set have one)",
        )


def _image_dtype(case_id, path, data):
    """int16 when lossless, else float32 (lossless for float32 NIfTI data)."""
    if np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.rint(data)):
        if data.size == 0 or (data.min() >= -32768 and data.max() <= 32767):
            return np.int16
    with np.errstate(over="ignore"):  # beyond float32's range: load_case says so
        rounded = data.dtype == np.float64 and not np.array_equal(data, data.astype(np.float32))
    if rounded:
        logging.warning("case %s: file %s: float64 intensities rounded to float32", case_id, path)
    return np.float32


def _warn_without_background(case_id, path, zero):
    """A warning when the fraction ``zero`` of an image's voxels that are 0 is
    under MIN_BACKGROUND_FRACTION: the method takes the non-zero voxels as the
    brain (§3.7's normalisation, the brain box), so an image whose background
    is not exactly 0 is normalised over the whole grid and segmented as if all
    of it were brain."""
    if zero < MIN_BACKGROUND_FRACTION:
        logging.warning(
            "case %s: file %s: only %.1f%% of the voxels are 0: the brain is taken to be the "
            "non-zero voxels (skull-stripped images, background exactly 0); is the "
            "background lost (resampled, or stored with scl_slope/scl_inter)?",
            case_id,
            path,
            100 * zero,
        )


def _read_images(case):
    """The four modalities' arrays (MODALITIES order), checked against the
    first one's shape and affine; returns (arrays, shape, affine)."""
    cid = case.case_id
    arrays = []
    ref_path = case.images[MODALITIES[0]]
    ref_shape = ref_affine = None
    for modality in MODALITIES:
        path = case.images[modality]
        data, affine = _load_nifti(cid, path)
        if ref_shape is None:
            ref_shape, ref_affine = data.shape, affine
        elif data.shape != ref_shape:
            raise BadCaseError(
                cid, path, f"shape {data.shape} differs from {ref_shape} of {ref_path}"
            )
        elif not np.allclose(affine, ref_affine, atol=AFFINE_ATOL, rtol=0):
            raise BadCaseError(
                cid,
                path,
                f"affine differs from that of {ref_path}: "
                f"{np.round(affine, 4).tolist()} vs {np.round(ref_affine, 4).tolist()}",
            )
        if not np.issubdtype(data.dtype, np.integer) and not np.isfinite(data).all():
            raise BadCaseError(cid, path, f"{int((~np.isfinite(data)).sum())} non-finite voxels")
        nonzero = np.count_nonzero(data)
        if not nonzero:
            raise BadCaseError(cid, path, "all voxels are zero")
        _warn_without_background(cid, path, 1.0 - nonzero / data.size)
        arrays.append(data)
    return arrays, ref_shape, ref_affine


def _read_label(case, ref_shape, ref_affine):
    """The label map, uint8 with LABEL_VALUES (2023's ET stored as LABEL_ET),
    checked against the images' shape and affine; None when there is none."""
    if case.label is None:
        return None
    cid, path, ref_path = case.case_id, case.label, case.images[MODALITIES[0]]
    data, affine = _load_nifti(cid, path)
    if data.shape != ref_shape:
        raise BadCaseError(cid, path, f"shape {data.shape} differs from {ref_shape} of {ref_path}")
    if not np.allclose(affine, ref_affine, atol=AFFINE_ATOL, rtol=0):
        raise BadCaseError(cid, path, f"affine differs from that of {ref_path}")
    if not np.issubdtype(data.dtype, np.integer) and not np.isfinite(data).all():
        raise BadCaseError(cid, path, "non-finite label values")
    allowed = LABELS_2023 if case.naming == layouts.NAMING_2023 else LABEL_VALUES
    values = np.unique(data)
    bad = [v for v in values.tolist() if v not in allowed]
    if bad:
        raise BadCaseError(
            cid, path, f"label values {bad[:5]} not in {list(allowed)} ({case.naming} naming)"
        )
    label = data.astype(np.uint8)
    if case.naming == layouts.NAMING_2023:
        label[label == LABEL_ET_2023] = LABEL_ET
    return label


def _crop_image(case, arrays, box, dtype):
    """The modalities cropped to ``box`` and cast to ``dtype``, stacked
    [d, h, w, 4]; a value beyond float32's range is a BadCaseError."""
    channels = []
    for modality, array in zip(MODALITIES, arrays):
        with np.errstate(over="ignore"):
            channel = array[box].astype(dtype)
        if dtype == np.float32 and not np.isfinite(channel).all():
            # finite float64 values beyond float32's range become inf in the cast
            raise BadCaseError(
                case.case_id,
                case.images[modality],
                f"{int((~np.isfinite(channel)).sum())} voxels beyond float32's "
                f"range (|value| > {float(np.finfo(np.float32).max):.4g})",
            )
        channels.append(channel)
    return np.stack(channels, axis=-1)


def load_case(case, require_label):
    """Reads and checks one case. Raises BadCaseError (one line) on any problem."""
    check_files(case, require_label)
    arrays, ref_shape, ref_affine = _read_images(case)
    dtypes = {_image_dtype(case.case_id, case.images[m], a) for m, a in zip(MODALITIES, arrays)}
    dtype = np.float32 if np.float32 in dtypes else np.int16
    label = _read_label(case, ref_shape, ref_affine)

    start, stop = nonzero_box(arrays + ([label] if label is not None else []))
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    image = _crop_image(case, arrays, box, dtype)
    counts = None
    if label is not None:
        label = np.ascontiguousarray(label[box])
        counts = {str(v): int((label == v).sum()) for v in LABEL_VALUES}
        counts[str(LABEL_BACKGROUND)] += int(np.prod(ref_shape)) - label.size  # outside the box
    return LoadedCase(
        case=case,
        image=image,
        label=label,
        original_shape=tuple(ref_shape),
        affine=np.asarray(ref_affine, dtype=np.float64),
        box_start=start,
        label_counts=counts,
    )
