"""NIfTI -> TFRecord: layouts, exact round trip, manifest and folds, every bad input,
nothing half-written (also when killed), reruns write the same bytes."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import oracles
import pytest
import tensorflow as tf
from importtime import imported_modules

from data_pipeline import convert, layouts, record_format, synthetic
from data_pipeline.constants import (
    LABEL_ET,
    LABEL_ET_2023,
    LABEL_VALUES,
    MODALITIES,
    MODALITIES_2023,
)
from data_pipeline.manifest import CONVERTER_VERSION, fold_files, read_manifest
from data_pipeline.volume import paste_crop

SHAPE = (40, 44, 32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, array, affine=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def _write(root, layout, case_id, seed, with_label=True, lgg=False):
    """One synthetic case in the given layout; returns (images, label) as written."""
    images, label = synthetic.make_case(SHAPE, seed=seed, lgg=lgg)
    if layout == "2018":
        folder = os.path.join(root, "LGG" if lgg else "HGG", case_id)
    else:
        folder = os.path.join(root, case_id)
    sep, suffixes = ("-", MODALITIES_2023) if layout == "2023" else ("_", MODALITIES)
    for m, s in zip(MODALITIES, suffixes):
        _save(os.path.join(folder, f"{case_id}{sep}{s}.nii.gz"), images[m])
    if with_label:
        on_disk = label.copy()
        if layout == "2023":
            on_disk[label == LABEL_ET] = LABEL_ET_2023
        _save(os.path.join(folder, f"{case_id}{sep}seg.nii.gz"), on_disk)
    return images, label


def _read_all(output_dir):
    """{case_id: parsed example as NumPy}, over every visible shard."""
    out = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "*" + record_format.SHARD_SUFFIX))):
        for record in tf.data.TFRecordDataset(path, record_format.COMPRESSION):
            ex = {k: v.numpy() for k, v in oracles.parse_example(record).items()}
            out[ex["case_id"].decode()] = ex
    return out


def _visible_outputs(output_dir):
    return sorted(n for n in os.listdir(output_dir)) if os.path.isdir(output_dir) else []


@pytest.fixture(scope="module")
def brats18(tmp_path_factory):
    """Five cases in the 2018 layout (two LGG) and their arrays."""
    root = str(tmp_path_factory.mktemp("brats18"))
    arrays = {}
    for n in range(5):
        case_id = f"Brats18_TST_{n}_1"
        arrays[case_id] = _write(root, "2018", case_id, seed=n, lgg=n >= 3)
    return root, arrays


@pytest.fixture(scope="module")
def converted(brats18, tmp_path_factory):
    root, arrays = brats18
    out = str(tmp_path_factory.mktemp("records"))
    manifest = convert.convert(root, out, cases_per_shard=1, folds=2, seed=0, progress=False)
    return out, manifest, arrays


def test_round_trip_is_exact(converted):
    out, manifest, arrays = converted
    parsed = _read_all(out)
    assert sorted(parsed) == sorted(arrays)
    for case_id, (images, label) in arrays.items():
        ex = parsed[case_id]
        assert tuple(ex["original_shape"]) == SHAPE
        np.testing.assert_array_equal(ex["affine"], np.eye(4))
        image = paste_crop(ex["image"], ex["original_shape"], ex["box_start"])
        for c, m in enumerate(MODALITIES):  # the documented channel order
            np.testing.assert_array_equal(image[..., c], images[m].astype(np.float32))
        np.testing.assert_array_equal(
            paste_crop(ex["label"], ex["original_shape"], ex["box_start"]), label
        )
        # the box is the non-zero bounding box: smaller than the volume, tight
        assert np.all(ex["box_shape"] < np.array(SHAPE))
        assert (ex["image"][0] != 0).any() and (ex["image"][-1] != 0).any()
        brain = images["t1"][images["t1"] != 0].astype(np.float64)
        np.testing.assert_allclose(ex["nonzero_mean"][0], brain.mean(), rtol=1e-6)
        np.testing.assert_allclose(ex["nonzero_std"][0], brain.std(), rtol=1e-6)


def test_manifest(converted):
    out, manifest, arrays = converted
    on_disk = read_manifest(out)
    assert on_disk["cases"] == manifest["cases"]
    assert on_disk["converter_version"] == CONVERTER_VERSION
    assert on_disk["options"] == {
        "cases_per_shard": 1,
        "num_shards": None,
        "folds": 2,
        "seed": 0,
        "skip_bad": False,
    }
    assert [c["case_id"] for c in manifest["cases"]] == sorted(arrays)
    for record in manifest["cases"]:
        _, label = arrays[record["case_id"]]
        assert record["label_counts"] == {str(v): int((label == v).sum()) for v in LABEL_VALUES}
        assert record["grade"] == ("LGG" if record["case_id"][-3] in "34" else "HGG")
        assert record["original_shape"] == list(SHAPE)
    shard_cases = [c for s in manifest["shards"] for c in s["cases"]]
    assert sorted(shard_cases) == sorted(arrays)
    for shard in manifest["shards"]:
        assert os.path.exists(os.path.join(out, shard["file"]))
        assert {c["fold"] for c in manifest["cases"] if c["case_id"] in shard["cases"]} == {
            shard["fold"]
        }
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_folds_partition_cases_and_balance_grades(converted):
    out, manifest, arrays = converted
    seen = []
    for fold in range(2):
        train, val = fold_files(out, fold)
        assert not set(train) & set(val)
        val_cases = [c for f in val for c in _cases_in(manifest, f)]
        seen += val_cases
        lgg = [c for c in val_cases if c.endswith(("3_1", "4_1"))]
        assert len(lgg) == 1  # stratified: one of the two LGG cases per fold
    assert sorted(seen) == sorted(arrays)
    with pytest.raises(ValueError, match="2"):
        fold_files(out, 2)


def _cases_in(manifest, path):
    name = os.path.basename(path)
    return next(s["cases"] for s in manifest["shards"] if s["file"] == name)


@pytest.mark.parametrize(
    "layout,case_ids",
    [
        ("2018", ["Brats18_CBICA_AAA_1", "Brats18_TCIA01_131_1"]),
        ("2020", ["BraTS20_Training_001", "BraTS20_Training_002"]),
        ("2021", ["BraTS2021_00000", "BraTS2021_00002"]),
        ("2023", ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]),
    ],
)
@pytest.mark.parametrize("with_label", [True, False])
def test_layouts(tmp_path, layout, case_ids, with_label):
    root = str(tmp_path / "in")
    arrays = {
        cid: _write(root, layout, cid, seed=i, with_label=with_label)
        for i, cid in enumerate(case_ids)
    }
    cases = layouts.find_cases(root)
    assert [c.case_id for c in cases] == sorted(case_ids)
    assert {c.naming for c in cases} == {
        layouts.NAMING_2023 if layout == "2023" else layouts.NAMING_2018
    }
    manifest = convert.convert(root, str(tmp_path / "out"), folds=1, progress=False)
    assert manifest["has_labels"] == with_label
    parsed = _read_all(str(tmp_path / "out"))
    for cid, (images, label) in arrays.items():
        ex = parsed[cid]
        image = paste_crop(ex["image"], ex["original_shape"], ex["box_start"])
        np.testing.assert_array_equal(image[..., MODALITIES.index("t1ce")], images["t1ce"])
        assert bool(ex["has_label"]) == with_label
        if with_label:  # 2023 label 3 comes back as 4
            np.testing.assert_array_equal(
                paste_crop(ex["label"], ex["original_shape"], ex["box_start"]), label
            )


# Each bad input: how to break case Brats18_BAD_1 (after it is written), and the
# file and the words its error must name.
def _missing_modality(folder):
    os.remove(os.path.join(folder, "Brats18_BAD_1_t1ce.nii.gz"))
    return "Brats18_BAD_1_t1ce.nii.gz", "missing t1ce"


def _missing_label(folder):
    os.remove(os.path.join(folder, "Brats18_BAD_1_seg.nii.gz"))
    return "Brats18_BAD_1_seg.nii.gz", "missing label"


def _shape_mismatch(folder):
    _save(os.path.join(folder, "Brats18_BAD_1_t2.nii.gz"), np.ones((40, 44, 31), np.int16))
    return "Brats18_BAD_1_t2.nii.gz", "shape (40, 44, 31)"


def _affine_mismatch(folder):
    path = os.path.join(folder, "Brats18_BAD_1_flair.nii.gz")
    affine = np.diag([1.0, 1.0, 1.2, 1.0])
    _save(path, np.asanyarray(nib.load(path).dataobj), affine)
    return "Brats18_BAD_1_flair.nii.gz", "affine differs"


def _not_finite(folder):
    path = os.path.join(folder, "Brats18_BAD_1_t1.nii.gz")
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    data[20, 20, 16] = np.nan
    _save(path, data)
    return "Brats18_BAD_1_t1.nii.gz", "non-finite"


def _label_value(value):
    def breaker(folder):
        path = os.path.join(folder, "Brats18_BAD_1_seg.nii.gz")
        data = np.asanyarray(nib.load(path).dataobj).copy()
        data[20, 20, 16] = value
        _save(path, data)
        return "Brats18_BAD_1_seg.nii.gz", f"label values [{value}]"

    return breaker


def _label_shape(folder):
    _save(os.path.join(folder, "Brats18_BAD_1_seg.nii.gz"), np.zeros((40, 44, 30), np.uint8))
    return "Brats18_BAD_1_seg.nii.gz", "shape (40, 44, 30)"


def _corrupt_file(folder):
    with open(os.path.join(folder, "Brats18_BAD_1_t2.nii.gz"), "wb") as f:
        f.write(b"\x1f\x8b this is not a NIfTI file")
    return "Brats18_BAD_1_t2.nii.gz", "cannot read"


def _empty_image(folder):
    _save(os.path.join(folder, "Brats18_BAD_1_flair.nii.gz"), np.zeros(SHAPE, np.int16))
    return "Brats18_BAD_1_flair.nii.gz", "all voxels are zero"


BAD_INPUTS = {
    "missing_modality": _missing_modality,
    "missing_label": _missing_label,
    "shape_mismatch": _shape_mismatch,
    "affine_mismatch": _affine_mismatch,
    "not_finite": _not_finite,
    "label_3_in_2018_naming": _label_value(3),
    "label_5": _label_value(5),
    "label_shape": _label_shape,
    "corrupt_file": _corrupt_file,
    "empty_image": _empty_image,
}


def _bad_set(root, breaker):
    for n, cid in enumerate(["Brats18_AOK_1", "Brats18_BAD_1", "Brats18_ZOK_1"]):
        _write(root, "2018", cid, seed=n)
    return breaker(os.path.join(root, "HGG", "Brats18_BAD_1"))


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, name):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    file_name, words = _bad_set(root, BAD_INPUTS[name])
    with pytest.raises(convert.BadCaseError) as error:
        convert.convert(root, out, cases_per_shard=1, folds=1, progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("case Brats18_BAD_1: file ")
    assert file_name in message and words in message
    assert not os.path.exists(out)  # no shard, no temporary file, no manifest, no folder


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_skipped_and_reported(tmp_path, name):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    file_name, _ = _bad_set(root, BAD_INPUTS[name])
    manifest = convert.convert(root, out, cases_per_shard=1, folds=1, skip_bad=True, progress=False)
    assert [s["case_id"] for s in manifest["skipped"]] == ["Brats18_BAD_1"]
    assert file_name in manifest["skipped"][0]["error"]
    assert sorted(_read_all(out)) == ["Brats18_AOK_1", "Brats18_ZOK_1"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.convert", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_line_error_is_one_line(tmp_path):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    _bad_set(root, _label_value(5))
    result = _cli("--input_dir", root, "--output_dir", out, "--folds", "1")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: case Brats18_BAD_1: file ") and "Brats18_BAD_1_seg.nii.gz" in last
    )
    assert "Traceback" not in result.stderr
    assert _visible_outputs(out) == []


def test_missing_file_is_answered_before_tensorflow_is_imported(tmp_path):
    """A case without one of its files stops the converter before TensorFlow
    (the shards' writer) is imported: one line, a fraction of a second."""
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    _bad_set(root, _missing_modality)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "data_pipeline.convert"]
        + ["--input_dir", root, "--output_dir", out, "--folds", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Brats18_BAD_1" in errors[0] and "t1ce" in errors[0], errors
    imported = imported_modules(result.stderr)
    assert "nibabel" in imported and "tensorflow" not in imported
    assert not os.path.exists(out)


def test_command_line_converts(tmp_path, brats18):
    root, arrays = brats18
    out = str(tmp_path / "out")
    result = _cli("--input_dir", root, "--output_dir", out, "--num_shards", "2", "--folds", "1")
    assert result.returncode == 0, result.stderr
    assert "5/5" in result.stderr  # progress bar with counts
    shards = sorted(glob.glob(os.path.join(out, "*" + record_format.SHARD_SUFFIX)))
    assert len(shards) == 2  # 5 cases, ceil(5 / 2) = 3 per shard
    assert sorted(_read_all(out)) == sorted(arrays)


@pytest.mark.parametrize("inside", [".", "HGG", "sub/dir"])
def test_refuses_output_inside_input(brats18, inside):
    root, _ = brats18
    out = os.path.normpath(os.path.join(root, inside))
    before = sorted(os.walk(root))
    with pytest.raises(ValueError, match="inside input_dir"):
        convert.convert(root, out, progress=False)
    assert sorted(os.walk(root)) == before


def test_refuses_to_overwrite_a_finished_conversion(brats18, converted):
    root, _ = brats18
    out, _, _ = converted
    with pytest.raises(ValueError, match="overwrite"):
        convert.convert(root, out, progress=False)


def test_killed_conversion_leaves_no_visible_shard_and_rerun_is_identical(tmp_path):
    root = str(tmp_path / "in")
    for n in range(12):
        _write(root, "2018", f"Brats18_K{n:02d}_1", seed=n)
    out = str(tmp_path / "out")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_pipeline.convert",
            "--input_dir",
            root,
            "--output_dir",
            out,
            "--cases_per_shard",
            "1",
            "--folds",
            "1",
            "--num_workers",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some shards are being written
        if len([n for n in _visible_outputs(out) if n.startswith(".tmp-")]) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it was killed mid-way, not finished
    leftovers = _visible_outputs(out)
    assert leftovers and all(n.startswith(".tmp-") for n in leftovers)
    assert not glob.glob(os.path.join(out, "*" + record_format.SHARD_SUFFIX))
    # tf.io.gfile.glob matches dotfiles
    assert not tf.io.gfile.glob(os.path.join(out, "*" + record_format.SHARD_SUFFIX))

    convert.convert(root, out, cases_per_shard=1, folds=1, progress=False)  # rerun
    clean = str(tmp_path / "clean")
    convert.convert(root, clean, cases_per_shard=1, folds=1, progress=False)
    names = sorted(n for n in os.listdir(clean) if n.endswith(record_format.SHARD_SUFFIX))
    assert len(names) == 12
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))  # temporary files gone
    for name in names:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(clean, name), "rb") as b:
            assert a.read() == b.read()
    with (
        open(os.path.join(out, "manifest.json")) as a,
        open(os.path.join(clean, "manifest.json")) as b,
    ):
        ma, mb = json.load(a), json.load(b)
    assert ma["cases"] == mb["cases"] and ma["shards"] == mb["shards"]


def test_float_intensities_are_stored_exactly(tmp_path):
    root = str(tmp_path / "in")
    images, _ = _write(root, "2021", "BraTS2021_00001", seed=0)
    path = os.path.join(root, "BraTS2021_00001", "BraTS2021_00001_t2.nii.gz")
    t2 = images["t2"].astype(np.float32) + np.where(images["t2"] != 0, 0.25, 0).astype(np.float32)
    _save(path, t2)
    convert.convert(root, str(tmp_path / "out"), folds=1, progress=False)
    ex = _read_all(str(tmp_path / "out"))["BraTS2021_00001"]
    image = paste_crop(ex["image"], ex["original_shape"], ex["box_start"])
    np.testing.assert_array_equal(image[..., MODALITIES.index("t2")], t2)
    np.testing.assert_array_equal(image[..., MODALITIES.index("t1")], images["t1"])


def test_image_without_zero_background_is_read_with_a_warning(tmp_path, caplog):
    # What a float image stored as int16 with scl_slope/scl_inter can become:
    # the background a small non-zero value, the whole grid "brain".
    root = str(tmp_path / "in")
    images, _ = _write(root, "2021", "BraTS2021_00001", seed=0)
    _write(root, "2021", "BraTS2021_00002", seed=1)
    path = os.path.join(root, "BraTS2021_00001", "BraTS2021_00001_flair.nii.gz")
    flair = images["flair"].astype(np.float32)
    _save(path, np.where(flair != 0, flair, np.float32(0.004)))
    convert.convert(root, str(tmp_path / "out"), folds=1, progress=False)
    warned = [r.getMessage() for r in caplog.records if "of the voxels are 0" in r.getMessage()]
    assert len(warned) == 1, warned  # the other case, and the other modalities, are not named
    assert "case BraTS2021_00001" in warned[0] and path in warned[0]
    assert "only 0.0% of the voxels are 0" in warned[0]


def test_every_case_bad_with_skip_bad_is_an_error(tmp_path):
    root = str(tmp_path / "in")
    _write(root, "2018", "Brats18_BAD_1", seed=0)
    os.remove(os.path.join(root, "HGG", "Brats18_BAD_1", "Brats18_BAD_1_t1.nii.gz"))
    with pytest.raises(ValueError, match="every case"):
        convert.convert(root, str(tmp_path / "out"), folds=1, skip_bad=True, progress=False)


def test_overwrite_replaces_a_finished_conversion(tmp_path, brats18):
    root, arrays = brats18
    out = str(tmp_path / "out")
    convert.convert(root, out, cases_per_shard=1, folds=1, progress=False)
    manifest = convert.convert(
        root, out, cases_per_shard=5, folds=1, overwrite=True, progress=False
    )
    shards = sorted(n for n in os.listdir(out) if n.endswith(record_format.SHARD_SUFFIX))
    assert shards == [s["file"] for s in manifest["shards"]] and len(shards) == 1  # stale ones gone
    assert sorted(_read_all(out)) == sorted(arrays)


def test_label_4_is_bad_in_2023_naming(tmp_path):
    root = str(tmp_path / "in")
    _write(root, "2023", "BraTS-GLI-00001-000", seed=0)
    path = os.path.join(root, "BraTS-GLI-00001-000", "BraTS-GLI-00001-000-seg.nii.gz")
    data = np.asanyarray(nib.load(path).dataobj).copy()
    data[20, 20, 16] = LABEL_ET  # 4 is not a 2023 label (ET is 3 there)
    _save(path, data)
    with pytest.raises(
        convert.BadCaseError, match=r"BraTS-GLI-00001-000-seg.nii.gz: label values \[4\]"
    ):
        convert.convert(root, str(tmp_path / "out"), folds=1, progress=False)
