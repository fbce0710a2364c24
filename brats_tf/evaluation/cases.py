"""The cases of an evaluation, in their ORIGINAL grid: ``open_cases`` reads a
converter output folder (TFRecords and manifest.json) or a folder of BraTS
NIfTI cases, one case at a time; ``et_label_for_data`` tells the ET label
their naming asks for (§1)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import tensorflow as tf

from brats_tf.evaluation.config import EvaluationError
from data_pipeline import cases as nifti_cases
from data_pipeline import constants, data_folder, features, layouts, record_format, volume
from data_pipeline import manifest as manifest_lib
from data_pipeline.shards import shard_error

log = logging.getLogger("brats_tf.evaluation")


@dataclasses.dataclass
class EvalCase:
    """One case in its ORIGINAL grid.

    image: [D, H, W, 4] float32 RAW intensities (``constants.MODALITIES`` order);
    label: [D, H, W] uint8 in the 2017-2021 values (ET = 4), or None (unlabelled);
    affine: 4x4; spacing: voxel size in mm along D, H, W; reference: the NIfTI
    path whose header the prediction copies (None: a header is made from the affine).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple
    reference: str | None
    source: str


@dataclasses.dataclass
class SkippedCase:
    """A case ``open_cases`` was asked to skip (``skip``) and did not read:
    one an interrupted evaluation has done."""

    case_id: str
    source: str


def spacing_from_affine(affine) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes: the column norms of the affine's 3x3 part."""
    affine = np.asarray(affine, np.float64)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _checked(fn, *args):
    """``fn(*args)`` of data_pipeline.data_folder, its DataFolderError as an
    EvaluationError (a BadCaseError as it is)."""
    try:
        return fn(*args)
    except data_folder.DataFolderError as e:
        raise EvaluationError(str(e)) from None


def _tfrecord_source(data: str, fold: int | None):
    """(files, number of cases, has_labels) of a converter output folder."""
    return _checked(data_folder.tfrecord_shards, data, fold)[:3]


def _tfrecord_cases(files, cases_of: dict, skip=frozenset()) -> Iterator[EvalCase | SkippedCase]:
    def decode(serialized):
        ex = features.parse_raw(serialized)
        image, label = features.decode_volumes(ex)
        return {
            "case_id": ex["case_id"],
            "image": image,
            "label": label,
            "has_label": ex["has_label"],
            "box_start": ex["box_start"],
            "original_shape": ex["original_shape"],
            "affine": ex["affine"],
        }

    for file in files:  # one file at a time: an error names that file (and the case)
        listed = cases_of.get(file)
        source = f"TFRecord {os.path.basename(file)}"
        if isinstance(listed, list) and listed and set(listed) <= set(skip):
            yield from (SkippedCase(case_id, source) for case_id in listed)  # not read
            continue
        yield from _tfrecord_file_cases(file, decode, listed, skip)


def _tfrecord_file_cases(file: str, decode, listed, skip) -> Iterator[EvalCase | SkippedCase]:
    it = iter(tf.data.TFRecordDataset(file, record_format.COMPRESSION).map(decode))
    index = 0
    while True:
        try:
            ex = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise EvaluationError(str(shard_error(file, index, listed, e))) from None
        index += 1
        case_id = ex["case_id"].numpy().decode()
        source = f"TFRecord {os.path.basename(file)}"
        if case_id in skip:
            yield SkippedCase(case_id, source)
            continue
        shape, start = ex["original_shape"].numpy(), ex["box_start"].numpy()
        affine = ex["affine"].numpy()
        label = None
        if bool(ex["has_label"].numpy()):
            label = volume.paste_crop(ex["label"].numpy(), shape, start)
        yield EvalCase(
            case_id=case_id,
            image=volume.paste_crop(ex["image"].numpy(), shape, start),
            label=label,
            affine=affine,
            spacing=spacing_from_affine(affine),
            reference=None,
            source=source,
        )


def _nifti_cases(cases, require_label: bool, skip=frozenset()) -> Iterator[EvalCase | SkippedCase]:
    for case in cases:
        if case.case_id in skip:
            yield SkippedCase(case.case_id, case.folder)  # not read
            continue
        loaded = nifti_cases.load_case(case, require_label)  # BadCaseError: one line, case and file
        ref = case.images[constants.MODALITIES[0]]
        label = None
        if loaded.label is not None:
            label = volume.paste_crop(loaded.label, loaded.original_shape, loaded.box_start)
        yield EvalCase(
            case_id=case.case_id,
            image=volume.paste_crop(
                loaded.image.astype(np.float32), loaded.original_shape, loaded.box_start
            ),
            label=label,
            affine=loaded.affine,
            spacing=tuple(float(z) for z in nib.load(ref).header.get_zooms()[:3]),
            reference=ref,
            source=case.folder,
        )


def open_cases(data: str, fold: int | None = None, skip=frozenset()):
    """(iterable of EvalCase, number of cases, has_labels) for a TFRecord or NIfTI folder.

    Cheap checks run now (manifest, shards present, every modality file
    present); the volumes are read lazily, one case at a time. A case whose
    id is in ``skip`` comes as a SkippedCase, unread where its id is known
    without reading it (NIfTI cases; every case of a shard skipped).
    """
    kind, found = _checked(data_folder.checked_source, data, fold)
    if kind == "tfrecord":
        files, count, has_labels, cases_of = found
        log.info(
            "data: %d TFRecord shard(s), %d case(s), %s, from %s",
            len(files),
            count,
            "labelled" if has_labels else "unlabelled",
            data,
        )
        return _tfrecord_cases(files, cases_of, frozenset(skip)), count, has_labels
    cases, has_labels = found
    if os.path.isfile(os.path.join(data, manifest_lib.MANIFEST)):
        log.warning(
            "data %s: its manifest.json is not the converter's (no converter_version, "
            "no shards): reading the folder as NIfTI cases",
            data,
        )
    log.info(
        "data: %d NIfTI case(s), %s, from %s",
        len(cases),
        "labelled" if has_labels else "unlabelled",
        data,
    )
    return _nifti_cases(cases, has_labels, frozenset(skip)), len(cases), has_labels


def et_label_for_data(data: str, fold: int | None = None) -> tuple[int, str]:
    """(ET label, why) that the cases of ``data`` (of ``fold``) are named for:
    3 when every case has the BraTS 2023 naming (``layouts.NAMING_2023``,
    from manifest.json's cases or the NIfTI files' names), 4 when every case
    has the 2018-2021 naming or the manifest does not record it. A mix is an
    EvaluationError (choose with ``EvalConfig.et_label``)."""
    if not os.path.isdir(data):
        raise EvaluationError(f"data {data}: not a folder")
    if data_folder.is_tfrecord_dir(data):
        manifest, _ = _checked(data_folder.tfrecord_manifest, data, fold)
        namings = [c.get("naming") for c in manifest["cases"] if fold is None or c["fold"] == fold]
    else:
        namings = [c.naming for c in _checked(data_folder.find_nifti_cases, data)]
    found = collections.Counter(namings)
    if found.get(layouts.NAMING_2023) and len(found) > 1:
        raise EvaluationError(
            f"data {data}: {found[layouts.NAMING_2023]} case(s) named as BraTS 2023, "
            f"{len(namings) - found[layouts.NAMING_2023]} not: pass --et_label=3 (BraTS 2023) "
            f"or --et_label=4 (2017-2021)"
        )
    if found.get(layouts.NAMING_2023):
        return constants.LABEL_ET_2023, "the data's BraTS 2023 naming"
    if found.get(layouts.NAMING_2018) == len(namings):
        return constants.LABEL_ET, "the data's BraTS 2018-2021 naming"
    return constants.LABEL_ET, "the default (the data's naming is not recorded)"
