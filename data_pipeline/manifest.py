"""manifest.json: the converter's record of a TFRecord folder (version, options,
shards, cases and folds), read and validated in one place.

The converter (``data_pipeline.convert``) writes it; the readers (the tf.data
input, train.py, evaluation, post-processing) import this module, not the
converter.
"""

from __future__ import annotations

import json
import os

from data_pipeline import record_format

CONVERTER_VERSION = "1.0"
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """manifest.json is unreadable, not the converter's, or does not match its shards;
    str() is one line naming the file."""


def _check(ok, path, problem):
    if not ok:
        raise ManifestError(f"{path}: {problem}")


def validate_manifest(manifest, path, check_shards=True):
    """Checks a parsed manifest (version, keys, types) and, with check_shards,
    that every shard it lists is there with the size it was written with.
    Raises ManifestError (one line naming ``path`` and what is wrong)."""
    _check(
        isinstance(manifest, dict),
        path,
        f"not a converter manifest (a JSON {type(manifest).__name__}, not an object)",
    )
    _check_versions(manifest, path)
    _check_structure(manifest, path)
    if check_shards:
        _check_shards(manifest, path)


def _check_versions(manifest, path):
    version = manifest.get("converter_version")
    _check(
        version is not None,
        path,
        "not a converter manifest (no converter_version): "
        "write one with python -m data_pipeline.convert",
    )
    _check(
        str(version).split(".")[0] == CONVERTER_VERSION.split(".")[0],
        path,
        f"converter_version {version!r}, this code reads {CONVERTER_VERSION}: reconvert "
        "the NIfTI files",
    )
    spec = manifest.get("feature_spec_version")
    _check(
        spec == record_format.FEATURE_SPEC_VERSION,
        path,
        f"feature_spec_version {spec!r}, this code reads {record_format.FEATURE_SPEC_VERSION}: "
        "reconvert the NIfTI files",
    )


def _check_structure(manifest, path):
    missing = [k for k in ("options", "shards", "cases") if k not in manifest]
    _check(not missing, path, f"missing key(s) {missing}")
    options = manifest["options"]
    _check(
        isinstance(options, dict)
        and isinstance(options.get("folds"), int)
        and options["folds"] >= 1,
        path,
        "options.folds is not an integer >= 1",
    )
    _check(
        isinstance(manifest["shards"], list) and manifest["shards"],
        path,
        "shards is not a non-empty list",
    )
    _check(isinstance(manifest["cases"], list), path, "cases is not a list")
    for i, shard in enumerate(manifest["shards"]):
        _check(
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and isinstance(shard.get("fold"), int)
            and "cases" in shard,
            path,
            f"shards[{i}] lacks file, fold or cases",
        )
    for i, case in enumerate(manifest["cases"]):
        _check(
            isinstance(case, dict)
            and isinstance(case.get("case_id"), str)
            and isinstance(case.get("fold"), int),
            path,
            f"cases[{i}] lacks case_id or fold",
        )


def _check_shards(manifest, path):
    folder = os.path.dirname(os.path.abspath(path))
    for shard in manifest["shards"]:
        file = os.path.join(folder, shard["file"])
        _check(os.path.isfile(file), path, f"shard {file} listed there is missing")
        size = os.path.getsize(file)
        _check(
            shard.get("bytes") in (None, size),
            path,
            f"shard {file} has {size} bytes, {shard.get('bytes')} when written: "
            "truncated or replaced; reconvert",
        )


def read_manifest(path, check_shards=True):
    """The validated manifest dict (``validate_manifest``), with "dir" = its folder;
    ``path`` is manifest.json or the folder holding it. Every reader of
    manifest.json comes through here. Raises ManifestError (one line, naming
    the file) for a manifest that is missing, unreadable, not valid JSON, of
    another version, or whose shards are missing or truncated."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    validate_manifest(manifest, path, check_shards)
    manifest["dir"] = os.path.dirname(os.path.abspath(path))
    return manifest


def fold_files(manifest_path, fold):
    """(train_files, validation_files): full shard paths for cross-validation fold `fold`
    (validation = that fold's shards, train = all others)."""
    manifest = read_manifest(manifest_path)
    folds = manifest["options"]["folds"]
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    train, val = [], []
    for shard in manifest["shards"]:
        (val if shard["fold"] == fold else train).append(
            os.path.join(manifest["dir"], shard["file"])
        )
    return train, val
