"""Writing a predicted BraTS label map as a NIfTI file beside its case: the
reference image's shape, affine and header, uint8 labels, an atomic write."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from data_pipeline import constants, volume
from data_pipeline.io_utils import atomic_path


def _reference(reference):
    """(shape or None, affine, header, path or None) from a path, a nibabel image or
    (affine, header)."""
    import nibabel as nib

    if isinstance(reference, (str, os.PathLike)):
        path = pathlib.Path(reference)
        if not path.is_file():
            raise FileNotFoundError(f"reference NIfTI not found: {path}")
        try:
            img = nib.load(str(path))
        except Exception as e:  # nibabel raises several types for bad files
            raise ValueError(f"cannot read reference NIfTI {path}: {e}") from None
        return tuple(img.shape[:3]), img.affine, img.header, path
    if hasattr(reference, "affine") and hasattr(reference, "header"):
        return tuple(reference.shape[:3]), reference.affine, reference.header, None
    if isinstance(reference, (tuple, list)) and len(reference) == 2:
        affine, header = reference
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
        shape = tuple(header.get_data_shape()[:3]) if header is not None else None
        return shape, affine, header, None
    raise ValueError(
        f"reference must be a NIfTI path, a nibabel image or (affine, header), got "
        f"{type(reference).__name__}"
    )


def _output_file(
    output_path, case_id: str | None, name: str, ref_path: pathlib.Path | None, overwrite: bool
) -> pathlib.Path:
    """The file ``write_prediction_nifti`` writes: ``output_path``, or
    ``<case_id>.nii.gz`` in it when it is a directory; checked to be a NIfTI
    name in an existing directory, not the reference, not an existing file
    unless ``overwrite``. ``name`` names the case in error messages."""
    out = pathlib.Path(output_path)
    if out.is_dir():
        if not case_id:
            raise ValueError(f"output_path {out} is a directory: give case_id to name the file")
        out = out / f"{case_id}.nii.gz"
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise ValueError(f"case {name}: output file must end in .nii.gz or .nii, got {out}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"case {name}: output directory does not exist: {out.parent}")
    if ref_path is not None and out.resolve() == ref_path.resolve():
        raise ValueError(f"case {name}: refusing to overwrite the input file {ref_path}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"case {name}: {out} exists (pass overwrite=True to replace it)")
    return out


def _full_label_map(label_map, shape, bbox_start, et_label: int, name: str) -> np.ndarray:
    """The [D, H, W] uint8 label map to write: a crop's labels pasted at
    ``bbox_start`` into the reference's ``shape``; checked against that shape
    and the BraTS label values."""
    labels = np.asarray(label_map)
    if bbox_start is not None:
        if shape is None:
            raise ValueError(f"case {name}: bbox_start needs a reference with a known shape")
        labels = volume.paste_crop(labels, shape, bbox_start)
    if labels.ndim != 3:
        raise ValueError(f"case {name}: label map must be [D, H, W], got shape {labels.shape}")
    if shape is not None and labels.shape != shape:
        raise ValueError(f"case {name}: label map shape {labels.shape} != reference shape {shape}")
    volume.labels_to_regions(labels, et_label)  # checks the values
    return labels.astype(np.uint8)


def _label_image(labels: np.ndarray, affine, header):
    """A uint8 Nifti1Image of ``labels`` with the reference's affine and header."""
    import nibabel as nib

    hdr = header.copy() if header is not None else nib.Nifti1Header()
    if not isinstance(hdr, nib.Nifti1Header):
        hdr = nib.Nifti1Header.from_header(hdr)
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)  # labels are stored as is, never rescaled
    return nib.Nifti1Image(labels, affine, header=hdr)


def write_prediction_nifti(
    label_map: np.ndarray,
    reference,
    output_path,
    case_id: str | None = None,
    bbox_start: Sequence[int] | None = None,
    et_label: int = constants.LABEL_ET,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a BraTS label map as uint8 NIfTI with the reference's shape, affine and header.

    Args:
      label_map: [D, H, W] integer labels (0, 1, 2, ``et_label``), or the
        labels of a crop when ``bbox_start`` is given (pasted with ``volume.paste_crop``).
      reference: the case's NIfTI path (e.g. its ``_flair.nii.gz``), a nibabel
        image, or (affine, header).
      output_path: the file to write (``.nii.gz``), or an existing directory,
        in which ``<case_id>.nii.gz`` is written.
      case_id: names the file in a directory, and the case in error messages.
      overwrite: replace an existing output file (never the reference).
    The file is written under a temporary name in the same directory and then
    renamed (``io_utils.atomic_path``), so a reader never sees half a file.
    Returns the written path.
    """
    import nibabel as nib

    shape, affine, header, ref_path = _reference(reference)
    name = case_id or (ref_path.name.split(".")[0] if ref_path else "prediction")
    out = _output_file(output_path, case_id, name, ref_path, overwrite)
    labels = _full_label_map(label_map, shape, bbox_start, et_label, name)
    img = _label_image(labels, affine, header)
    # ".nii.gz" ending so nibabel compresses; a hidden name a directory watcher skips.
    with atomic_path(out, suffix=".nii.gz" if out.name.endswith(".nii.gz") else ".nii") as tmp:
        nib.save(img, str(tmp))
    return out
