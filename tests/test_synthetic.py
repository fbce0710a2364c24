"""Synthetic BraTS-like cases: layout, dtypes, labels, contrasts, determinism, command line."""

import itertools
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_pipeline import synthetic
from data_pipeline.constants import LABEL_ED, LABEL_ET, LABEL_NCR_NET, LABEL_VALUES, MODALITIES

SHAPE = (48, 48, 32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cases():
    return {
        (seed, lgg): synthetic.make_case(SHAPE, seed=seed, lgg=lgg)
        for seed, lgg in itertools.product(range(3), (False, True))
    }


@pytest.mark.parametrize("seed,lgg", list(itertools.product(range(3), (False, True))))
def test_case_arrays(cases, seed, lgg):
    images, label = cases[(seed, lgg)]
    assert list(images) == list(MODALITIES)
    assert label.shape == SHAPE and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(LABEL_VALUES)
    brain = images[MODALITIES[0]] != 0
    for m in MODALITIES:
        assert images[m].shape == SHAPE and images[m].dtype == np.int16
        # Skull-stripped: the same brain mask in every modality, zero outside.
        np.testing.assert_array_equal(images[m] != 0, brain)
    assert not brain[0].any() and not brain[-1].any()  # background around the brain
    assert 0.05 < brain.mean() < 0.5
    assert not (label[~brain]).any()  # the tumour is inside the brain
    assert (label == LABEL_ED).any() and (label == LABEL_NCR_NET).any()
    assert (label == LABEL_ET).any() != lgg  # LGG-like cases have no enhancing tumour


@pytest.mark.parametrize("seed", range(3))
def test_contrasts_like_real_scans(cases, seed):
    images, label = cases[(seed, False)]
    brain = images["t1"] != 0
    normal = brain & (label == 0)

    def mean(m, mask):
        return images[m][mask].mean()

    edema = label == LABEL_ED
    for m in ("t2", "flair"):  # edema bright on T2 and FLAIR
        assert mean(m, edema) > 1.2 * mean(m, normal)
    # enhancing rim brightest on T1ce, necrotic core dark on T1ce
    assert mean("t1ce", label == LABEL_ET) > 1.3 * mean("t1ce", normal)
    assert mean("t1ce", label == LABEL_NCR_NET) < 0.6 * mean("t1ce", normal)
    # not constant inside a class: noise and bias field
    assert images["t1"][normal].std() > 0.05 * mean("t1", normal)


def test_deterministic_for_a_seed():
    a_img, a_lab = synthetic.make_case(SHAPE, seed=7)
    b_img, b_lab = synthetic.make_case(SHAPE, seed=7)
    c_img, c_lab = synthetic.make_case(SHAPE, seed=8)
    np.testing.assert_array_equal(a_lab, b_lab)
    for m in MODALITIES:
        np.testing.assert_array_equal(a_img[m], b_img[m])
    assert not np.array_equal(a_lab, c_lab)


def test_write_dataset_layout(tmp_path):
    dirs = synthetic.write_synthetic_dataset(
        str(tmp_path), 4, SHAPE, seed=1, lgg_fraction=0.5, progress=False
    )
    assert len(dirs) == 4
    grades = set()
    for n, case_dir in enumerate(dirs):
        case_id = f"Brats18_SYN_{n:04d}_1"
        grade = os.path.basename(os.path.dirname(case_dir))
        grades.add(grade)
        assert os.path.basename(case_dir) == case_id and grade in ("HGG", "LGG")
        assert sorted(os.listdir(case_dir)) == sorted(
            f"{case_id}_{s}.nii.gz" for s in MODALITIES + ("seg",)
        )
        seg = nib.load(os.path.join(case_dir, f"{case_id}_seg.nii.gz"))
        assert seg.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(seg.affine, np.eye(4))  # 1 mm isotropic
        assert seg.header.get_zooms() == (1.0, 1.0, 1.0)
        t1 = nib.load(os.path.join(case_dir, f"{case_id}_t1.nii.gz"))
        assert t1.get_data_dtype() == np.int16 and t1.shape == SHAPE
        labels = np.asanyarray(seg.dataobj)
        assert (labels == LABEL_ET).any() == (grade == "HGG")
    assert grades == {"HGG", "LGG"}  # seed 1, fraction 0.5: both kinds among 4


def test_case_does_not_depend_on_num_cases(tmp_path):
    one = synthetic.write_synthetic_dataset(str(tmp_path / "a"), 1, SHAPE, seed=3, progress=False)
    three = synthetic.write_synthetic_dataset(str(tmp_path / "b"), 3, SHAPE, seed=3, progress=False)
    name = "Brats18_SYN_0000_1_flair.nii.gz"
    a = np.asanyarray(nib.load(os.path.join(one[0], name)).dataobj)
    b = np.asanyarray(nib.load(os.path.join(three[0], name)).dataobj)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(num_cases=0), dict(lgg_fraction=1.5)])
def test_bad_arguments(tmp_path, kwargs):
    args = dict(output_dir=str(tmp_path), num_cases=2, shape=SHAPE) | kwargs
    with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
        synthetic.write_synthetic_dataset(**args)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.synthetic", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line(tmp_path):
    out = tmp_path / "syn"
    result = _cli(
        "--output_dir",
        str(out),
        "--num_cases",
        "2",
        "--shape",
        "32,40,24",
        "--seed",
        "5",
        "--lgg_fraction",
        "0",
    )
    assert result.returncode == 0, result.stderr
    case = out / "HGG" / "Brats18_SYN_0001_1" / "Brats18_SYN_0001_1_t1ce.nii.gz"
    assert nib.load(str(case)).shape == (32, 40, 24)
    assert "2/2" in result.stderr  # progress bar with counts


@pytest.mark.parametrize("shape", ["32,40", "8,8,8", "a,b,c"])
def test_command_line_bad_shape(tmp_path, shape):
    result = _cli("--output_dir", str(tmp_path), "--shape", shape)
    assert result.returncode != 0
    assert shape in result.stderr
    assert not os.listdir(tmp_path)
