"""The whole path on real BraTS 2018 cases: convert, train, evaluate a whole volume.

Real cases are never part of the repository: the environment variable
BRATS_REAL_DIR names a folder of them (BraTS layout: <folder>/.../<case>/
<case>_{t1,t1ce,t2,flair,seg}.nii.gz); `.ci/run` sets it where the project's
development copy of 16 BraTS 2018 cases is beside the checkout. Without it the
test skips, so a fresh clone still passes. Nothing derived from the cases'
images is written outside pytest's temporary folders.

Two cases (an HGG and an LGG where both grades are there) are converted, a
tiny network (configs/smoke.flags: 32^3 crops, 2 levels, here at width 4:
the 8 flips of the volume are most of the test's time) trains four steps
on them, and evaluate.py predicts one of them, restored from the run's last
checkpoint, with the 8 mirror flips as it does by default: the network on
the case's brain box (found in the real case's own background), the whole
240 x 240 x 155 grid written (the network on the whole grid, --nocrop_to_brain,
is tested on synthetic volumes of odd sizes: tests/test_inference.py). The
prediction must carry the input's grid, affine and spacing, and the scores
evaluate.py writes must equal a NumPy Dice of the prediction file against the
case's seg file. A real case made faulty in a temporary folder (a modality
missing, a label 3, a FLAIR of 154 slices) stops the converter in one line
naming the case and the file.
"""

import concurrent.futures
import csv
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
REAL_DIR = os.environ.get("BRATS_REAL_DIR")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
ENV.pop("TF_CONFIG", None)

pytestmark = [
    pytest.mark.skipif(
        not REAL_DIR, reason="BRATS_REAL_DIR is not set: no real BraTS cases to test on"
    ),
    pytest.mark.heavy,  # tests/conftest.py: scheduled first
]


def _case_folders(root: pathlib.Path) -> list[pathlib.Path]:
    """Folders holding a <case>_seg.nii.gz beside its four modalities, sorted by name."""
    return sorted((p.parent for p in root.rglob("*_seg.nii.gz")), key=lambda p: p.name)


def _run(args):
    result = subprocess.run(
        [sys.executable] + [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = pathlib.Path(REAL_DIR)
    assert root.is_dir(), f"BRATS_REAL_DIR={REAL_DIR} is not a folder"
    folders = _case_folders(root)
    assert len(folders) >= 2, f"BRATS_REAL_DIR={REAL_DIR} holds fewer than 2 labelled cases"
    lgg = [f for f in folders if f.parent.name == "LGG"]
    chosen = [next(f for f in folders if f not in lgg), lgg[0]] if lgg else folders[:2]
    tmp = tmp_path_factory.mktemp("real")
    nifti, one = tmp / "nifti", tmp / "one_case"
    nifti.mkdir()
    one.mkdir()
    for folder in chosen:  # links, not copies: the cases stay where they are
        (nifti / folder.name).symlink_to(folder, target_is_directory=True)
    (one / chosen[0].name).symlink_to(chosen[0], target_is_directory=True)
    _run(
        [
            "-m",
            "data_pipeline.convert",
            f"--input_dir={nifti}",
            f"--output_dir={tmp / 'tfr'}",
            "--folds=2",
            "--num_workers=1",
        ]
    )
    _run(
        [
            ROOT / "train.py",
            f"--flagfile={ROOT / 'configs' / 'smoke.flags'}",
            f"--data_dir={tmp / 'tfr'}",
            f"--model_dir={tmp / 'run'}",
            "--fold=-1",
            "--validate_every=0",
            "--init_filters=4",
            "--groups=4",
            "--noexport",  # evaluate.py restores the model_dir's last checkpoint
        ]
    )
    _run(
        [
            ROOT / "evaluate.py",
            f"--model={tmp / 'run'}",
            f"--data={one}",
            "--tta",
            f"--output_dir={tmp / 'eval'}",
            "--noprogress",
            "--nofigures",
        ]
    )
    return {"case": chosen[0], "tmp": tmp}


def test_real_cases_train_and_a_whole_volume_is_predicted_on_their_grid(real_run):
    case = real_run["case"]
    flair = nib.load(case / f"{case.name}_flair.nii.gz")
    pred = nib.load(real_run["tmp"] / "eval" / "predictions" / f"{case.name}.nii.gz")
    assert pred.shape == flair.shape == (240, 240, 155)
    np.testing.assert_allclose(pred.affine, flair.affine, atol=1e-6)
    np.testing.assert_allclose(pred.header.get_zooms()[:3], flair.header.get_zooms()[:3])
    for key in ("sform_code", "qform_code", "xyzt_units"):
        assert int(pred.header[key]) == int(flair.header[key]), key
    np.testing.assert_allclose(pred.header.get_sform(), flair.header.get_sform(), atol=1e-6)
    labels = np.asarray(pred.dataobj)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    history = (real_run["tmp"] / "run" / "history.json").read_text()
    assert '"epoch": 2' in history  # two epochs of two steps, as smoke.flags says


def test_real_case_scores_equal_numpy_dice_of_the_written_prediction(real_run):
    case = real_run["case"]
    truth = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj)
    pred = np.asarray(
        nib.load(real_run["tmp"] / "eval" / "predictions" / f"{case.name}.nii.gz").dataobj
    )
    with open(real_run["tmp"] / "eval" / "per_case.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["case_id"] == case.name
    regions = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    for region, labels in regions.items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        total = p.sum() + t.sum()
        expected = 1.0 if total == 0 else 2.0 * np.logical_and(p, t).sum() / total
        assert float(row[f"{region}_dice"]) == pytest.approx(expected, abs=1e-9), region


def _bad_copy(case: pathlib.Path, root: pathlib.Path, fault: str) -> str:
    """root/<case>: the case's files linked, one of them missing or replaced by a
    faulty copy; returns the name of the file the error must name."""
    folder = root / case.name
    folder.mkdir(parents=True)
    names = {m: f"{case.name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")}
    for m, name in names.items():
        if not (fault == "missing_t1ce" and m == "t1ce"):
            (folder / name).symlink_to(case / name)
    if fault == "label_3":
        seg = nib.load(case / names["seg"])
        data = np.asarray(seg.dataobj).copy()
        data[tuple(np.argwhere(data == 2)[0])] = 3  # 3 is no BraTS 2018 label
        (folder / names["seg"]).unlink()
        nib.save(nib.Nifti1Image(data, seg.affine, seg.header), folder / names["seg"])
        return names["seg"]
    if fault == "flair_154_slices":
        flair = nib.load(case / names["flair"])
        (folder / names["flair"]).unlink()
        nib.save(
            nib.Nifti1Image(np.asarray(flair.dataobj)[..., :154], flair.affine, flair.header),
            folder / names["flair"],
        )
        return names["flair"]
    return names["t1ce"]


FAULTS = ("missing_t1ce", "label_3", "flair_154_slices")


@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory):
    """The converter on a real case with each fault, the runs side by side."""
    case = _case_folders(pathlib.Path(REAL_DIR))[0]
    jobs = {}
    for fault in FAULTS:
        tmp = tmp_path_factory.mktemp(fault)
        expected_file = _bad_copy(case, tmp / "in", fault)
        jobs[fault] = (
            tmp,
            expected_file,
            [
                sys.executable,
                "-m",
                "data_pipeline.convert",
                f"--input_dir={tmp / 'in'}",
                f"--output_dir={tmp / 'out'}",
                "--folds=1",
                "--num_workers=1",
            ],
        )
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        procs = {
            fault: pool.submit(
                subprocess.run, cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300
            )
            for fault, (_, _, cmd) in jobs.items()
        }
        return {
            fault: (case, jobs[fault][0], jobs[fault][1], procs[fault].result()) for fault in FAULTS
        }


@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_real_case_stops_the_converter_in_one_line(faulty_runs, fault):
    """A real case with a modality missing, a label outside {0, 1, 2, 4} or a
    modality of another shape: one line naming the case and the file, exit
    status 1, no output folder."""
    case, tmp, expected_file, proc = faulty_runs[fault]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert case.name in errors[0] and expected_file in errors[0], errors[0]
    assert not (tmp / "out").exists()
