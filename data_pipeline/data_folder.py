"""A folder of cases to evaluate, checked without reading a volume and
without TensorFlow: the converter's output (manifest.json and its shards) or
a folder of BraTS NIfTI cases. evaluate.py runs these checks before it
imports TensorFlow, so that a bad folder is answered at once; the evaluation
reads the cases they return."""

from __future__ import annotations

import json
import os

from data_pipeline import layouts, record_format
from data_pipeline import manifest as manifest_lib
from data_pipeline.cases import check_files
from data_pipeline.checks import one_line


class DataFolderError(ValueError):
    """A folder that cannot be evaluated; str() is one line naming it."""


def is_tfrecord_dir(data) -> bool:
    """A converter output folder: manifest.json there, written by the converter or
    beside shards (a NIfTI folder may hold an unrelated manifest.json)."""
    path = os.path.join(str(data), manifest_lib.MANIFEST)
    if not os.path.isfile(path):
        return False
    if any(name.endswith(record_format.SHARD_SUFFIX) for name in os.listdir(str(data))):
        return True
    try:
        with open(path) as f:
            return "converter_version" in json.load(f)
    except (OSError, ValueError, TypeError):
        return True  # unreadable: read_manifest says why


def tfrecord_manifest(data: str, fold: int | None):
    """(manifest, its shards of ``fold`` (all when None)) of a converter output folder."""
    try:
        manifest = manifest_lib.read_manifest(data)  # validated: version, keys, shards there
    except ValueError as e:
        raise DataFolderError(f"data {data}: {one_line(e)}") from None
    if fold is None:
        return manifest, manifest["shards"]
    folds = manifest["options"]["folds"]
    if not 0 <= fold < folds:
        raise DataFolderError(f"fold must be in [0, {folds}) for {data}, got {fold}")
    return manifest, [s for s in manifest["shards"] if s["fold"] == fold]


def tfrecord_shards(data: str, fold: int | None):
    """(files, number of cases, has_labels, {file: its case ids}) of a converter
    output folder, checked: every shard there, some case."""
    manifest, shards = tfrecord_manifest(data, fold)
    files = [os.path.join(manifest["dir"], s["file"]) for s in shards]
    for f in files:
        if not os.path.isfile(f):
            raise DataFolderError(f"data {data}: shard {f} listed in manifest.json is missing")
    if not files:
        raise DataFolderError(f"data {data}: no shard (fold {fold})")
    count = sum(
        len(s["cases"]) if isinstance(s["cases"], list) else int(s["cases"]) for s in shards
    )
    if count == 0:
        raise DataFolderError(
            f"data {data}: no case in fold {fold} (the converter skipped "
            f"them: manifest.json's skipped)"
        )
    cases_of = {file: s["cases"] for file, s in zip(files, shards)}
    return files, count, bool(manifest.get("has_labels", True)), cases_of


def find_nifti_cases(data: str) -> list:
    """The BraTS cases of a NIfTI folder (``layouts.find_cases``)."""
    try:
        return layouts.find_cases(data)
    except (ValueError, FileNotFoundError) as e:
        raise DataFolderError(f"data {data}: {one_line(e)}") from None


def nifti_cases(data: str) -> tuple[list, bool]:
    """(the cases of a NIfTI folder, has_labels), every modality file of every
    case there (a BadCaseError naming the first one missing)."""
    cases = find_nifti_cases(data)
    has_labels = any(c.label is not None for c in cases)
    for case in cases:
        check_files(case, has_labels)
    return cases, has_labels


def checked_source(data: str, fold: int | None = None):
    """The checks of a folder to evaluate that read no volume: a folder; a
    converter output whose manifest validates, with ``fold`` among its folds
    and its shards there; or NIfTI cases with every modality file (a fold
    only for the converter's output). Returns ("tfrecord", tfrecord_shards's
    tuple) or ("nifti", nifti_cases's tuple); DataFolderError or BadCaseError,
    one line."""
    if not os.path.isdir(data):
        raise DataFolderError(f"data {data}: not a folder")
    if is_tfrecord_dir(data):
        return "tfrecord", tfrecord_shards(data, fold)
    if fold is not None:
        raise DataFolderError(
            f"fold {fold} given but data {data} is not a TFRecord folder "
            f"(no converter manifest.json)"
        )
    return "nifti", nifti_cases(data)
