"""Bad input and faults, met as a user meets them: through the command lines of
the converter, train.py, evaluate.py and the serving client.

Each fault must end in one line that names the file (and the case, where there
is one), a non-zero exit status, and nothing written or deleted that the run
did not own. Every test here failed before its fix: the docstrings say how.

The runs are subprocesses; those that do not depend on each other run side by
side (``_run_all``), a few at a time, and each test then checks its own.
"""

import concurrent.futures
import dataclasses
import http.server
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import keras
import nibabel as nib
import numpy as np
import pytest
from tiny_data import synthetic_tfrecords

from brats_tf.config import ModelConfig
from brats_tf.model import build_inference_model, build_model
from data_pipeline import constants

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
ENV.pop("TF_CONFIG", None)
SMOKE = ROOT / "configs" / "smoke.flags"
# The model configs/smoke.flags trains (train.py's defaults otherwise).
SMOKE_MODEL = ModelConfig(
    input_shape=(32, 32, 32), init_filters=8, latent_dim=16, blocks_down=(1, 1), blocks_up=(1,)
)


def _command(tool, args):
    if tool == "convert":
        return [sys.executable, "-m", "data_pipeline.convert", "--num_workers=1"] + args
    if tool == "client":
        return [sys.executable, "-m", "serving.client"] + args
    return (
        [sys.executable, str(ROOT / f"{tool}.py")]
        + ([f"--flagfile={SMOKE}"] if tool == "train" else ["--noprogress"])
        + args
    )


def _run(tool, args, env=None):
    return subprocess.run(
        _command(tool, [str(a) for a in args]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENV, **(env or {})},
        timeout=300,
    )


def _run_all(jobs):
    """{name: (tool, args[, env])} -> {name: CompletedProcess}, three at a time."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(_run, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _error_line(proc, prefix):
    """The one error line of a failed run (asserts there is exactly one, and no traceback)."""
    assert proc.returncode not in (0, None), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _files(folder):
    """{relative path: bytes} of everything under folder (hidden files too)."""
    folder = pathlib.Path(folder)
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Four synthetic NIfTI cases (nii/) and their conversion in two folds (tfr/)."""
    root = tmp_path_factory.mktemp("faults")
    synthetic_tfrecords(root, 4, (40, 40, 32), folds=2)
    return root


def _case_dirs(nii):
    return sorted(p for p in pathlib.Path(nii).glob("*/*") if p.is_dir())


def _nii_copy(root, dst, n=None):
    """A copy of root/nii's first n NIfTI cases (all by default), in dst."""
    for case in _case_dirs(root / "nii")[:n]:
        shutil.copytree(case, dst / case.parent.name / case.name)
    return dst


def _tfr_copy(root, dst):
    shutil.copytree(root / "tfr", dst)
    return dst


def _flip_middle(path, n=64):
    """Corrupts a file in place: n bytes in its middle inverted, its size unchanged."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
    path.write_bytes(bytes(data))


def _nii_2023(root, dst, n):
    """root/nii's first n cases renamed as BraTS 2023 names them (-t1n, -t1c, -t2w,
    -t2f, -seg; ET written as 3)."""
    suffixes = dict(zip(constants.MODALITIES, constants.MODALITIES_2023), seg="seg")
    for case in _case_dirs(root / "nii")[:n]:
        case_id = case.name.replace("Brats18_SYN", "BraTS-GLI")
        (dst / case_id).mkdir(parents=True)
        for old, new in suffixes.items():
            img = nib.load(case / f"{case.name}_{old}.nii.gz")
            array = np.asarray(img.dataobj)
            if old == "seg":
                array = np.where(array == constants.LABEL_ET, constants.LABEL_ET_2023, array)
            nib.save(
                nib.Nifti1Image(array.astype(img.get_data_dtype()), img.affine, img.header),
                dst / case_id / f"{case_id}-{new}.nii.gz",
            )
    return dst


def _times(folder):
    """{relative path: (bytes, mtime in ns)} of everything under folder."""
    folder = pathlib.Path(folder)
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model(root):
    """A tiny untrained inference model as a .keras file."""
    keras.utils.set_random_seed(0)
    path = root / "tiny.keras"
    build_inference_model(build_model(SMOKE_MODEL)).save(str(path))
    return path


def _make_converter_inputs(root, r):
    """The converter's faulty inputs and output folders under r: the input folders."""
    # three cases in three folds, one unreadable: --skip_bad leaves its fold empty
    empty_fold_in = _nii_copy(root, r / "empty_fold_in", 3)
    flair = next(empty_fold_in.rglob("*_flair.nii.gz"))
    flair.write_bytes(b"not a NIfTI file")
    # a float64 voxel beyond float32's range: finite in the file, inf once cast
    overflow_in = _nii_copy(root, r / "overflow_in", 1)
    t1 = next(overflow_in.rglob("*_t1.nii.gz"))
    img = nib.load(t1)
    data = np.asanyarray(img.dataobj).astype(np.float64)
    data[tuple(np.argwhere(data != 0)[0])] = 1e39
    nib.save(nib.Nifti1Image(data, img.affine), t1)
    # a case folder renamed: its files no longer carry the folder's name
    mismatch_in = _nii_copy(root, r / "mismatch_in", 2)
    renamed = _case_dirs(mismatch_in)[1]
    renamed.rename(renamed.parent / "Renamed_Case")
    # an output folder holding someone's files: a stray shard, a hidden .tmp- file
    (r / "stray").mkdir()
    (r / "stray" / "brats-fold0-000-of-001.tfrecord").write_bytes(b"mine")
    (r / "stray" / ".tmp-notes").write_bytes(b"mine")
    (r / "foreign_tmp").mkdir()
    (r / "foreign_tmp" / ".tmp-notes").write_bytes(b"mine")
    (r / "a_file").write_bytes(b"mine")
    # root/nii's four cases and a fifth that fails only when read (its FLAIR is not NIfTI)
    skip_folds_in = _nii_copy(root, r / "skip_folds_in")
    first = _case_dirs(skip_folds_in)[0]
    bad = first.parent / "Brats18_SYN_0004_1"
    shutil.copytree(first, bad)
    for path in list(bad.iterdir()):
        path.rename(bad / path.name.replace(first.name, bad.name))
    (bad / f"{bad.name}_flair.nii.gz").write_bytes(b"not a NIfTI file")
    return empty_fold_in, overflow_in, mismatch_in, skip_folds_in


def _converter_jobs(root, r, inputs):
    """The converter's fault runs: {name: (script, arguments)}."""
    empty_fold_in, overflow_in, mismatch_in, skip_folds_in = inputs
    nii = root / "nii"
    return {
        "empty_fold": (
            "convert",
            [f"--input_dir={empty_fold_in}", f"--output_dir={r / 'ef'}", "--folds=3", "--skip_bad"],
        ),
        "overflow": (
            "convert",
            [f"--input_dir={overflow_in}", f"--output_dir={r / 'of'}", "--folds=1"],
        ),
        "mismatch": (
            "convert",
            [f"--input_dir={mismatch_in}", f"--output_dir={r / 'mm'}", "--folds=1"],
        ),
        "output_is_file": ("convert", [f"--input_dir={nii}", f"--output_dir={r / 'a_file'}"]),
        "stray": ("convert", [f"--input_dir={nii}", f"--output_dir={r / 'stray'}", "--folds=1"]),
        "foreign_tmp": (
            "convert",
            [f"--input_dir={nii}", f"--output_dir={r / 'foreign_tmp'}", "--folds=1"],
        ),
        "same_a": (
            "convert",
            [
                f"--input_dir={nii}",
                f"--output_dir={r / 'same_a'}",
                "--folds=2",
                "--cases_per_shard=1",
            ],
        ),
        "skip_folds": (
            "convert",
            [
                f"--input_dir={skip_folds_in}",
                f"--output_dir={r / 'sf'}",
                "--folds=2",
                "--cases_per_shard=1",
                "--skip_bad",
            ],
        ),
        "same_b": (
            "convert",
            [
                f"--input_dir={nii}",
                f"--output_dir={r / 'same_b'}",
                "--folds=2",
                "--cases_per_shard=1",
            ],
        ),
    }


@pytest.fixture(scope="module")
def converter_runs(root):
    """The converter's fault runs, side by side."""
    r = root / "convert"
    r.mkdir()
    inputs = _make_converter_inputs(root, r)
    return r, _run_all(_converter_jobs(root, r, inputs))


def _manifest(folder):
    return json.loads((pathlib.Path(folder) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def train_runs(root, converter_runs):
    """train.py's fault runs, side by side; each has its own model_dir under root/train."""
    r = root / "train"
    r.mkdir()
    data = {}
    data["truncated_shard"] = _tfr_copy(root, r / "truncated")
    shard = sorted(data["truncated_shard"].glob("*.tfrecord"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    data["missing_shard"] = _tfr_copy(root, r / "missing")
    sorted(data["missing_shard"].glob("*.tfrecord"))[1].unlink()
    data["empty_manifest"] = _tfr_copy(root, r / "empty_manifest")
    (data["empty_manifest"] / "manifest.json").write_text("{}")
    data["invalid_json_manifest"] = _tfr_copy(root, r / "invalid_json")
    (data["invalid_json_manifest"] / "manifest.json").write_text('{"converter_version": ')
    # a training shard (fold 1; --fold=0 trains on it) corrupted in place
    data["corrupt_shard"] = _tfr_copy(root, r / "corrupt")
    _flip_middle(sorted(data["corrupt_shard"].glob("brats-fold1-*.tfrecord"))[0])
    # a model_dir of an earlier run of the smoke model, init_filters=8, and one
    # more such with a file of the user's
    config = {"model": dataclasses.asdict(SMOKE_MODEL), "data": {"fold": 0}}
    earlier = r / "earlier"
    for folder in (earlier, r / "existing"):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (folder / "flags.txt").write_text("--init_filters=8\n")
    (r / "existing" / "notes.txt").write_text("mine")
    conv, runs = converter_runs
    empty_fold = _manifest(conv / "ef")["empty_folds"][0]
    tfr = root / "tfr"
    jobs = {
        name: ("train", [f"--data_dir={path}", f"--model_dir={r / ('md_' + name)}"])
        for name, path in data.items()
    }
    jobs["other_architecture"] = (
        "train",
        [f"--data_dir={tfr}", f"--model_dir={earlier}", "--init_filters=16"],
    )
    jobs["bad_tf_config"] = (
        "train",
        [f"--data_dir={tfr}", f"--model_dir={r / 'md_tfc'}", "--strategy=multi_worker"],
        {"TF_CONFIG": '{"cluster": {"worker": ["localhost:1"]'},
    )
    jobs["too_many_steps"] = (
        "train",
        [f"--data_dir={tfr}", f"--model_dir={r / 'md_steps'}", "--fold=-1", "--steps_per_epoch=50"],
    )
    jobs["empty_fold"] = (
        "train",
        [f"--data_dir={conv / 'ef'}", f"--model_dir={r / 'md_ef'}", f"--fold={empty_fold}"],
    )
    jobs["corrupt_shard_existing"] = (
        "train",
        [f"--data_dir={data['corrupt_shard']}", f"--model_dir={r / 'existing'}"],
    )
    jobs["nifti_data_dir"] = (
        "train",
        [f"--data_dir={root / 'nii'}", f"--model_dir={r / 'md_nifti'}"],
    )
    jobs["finished"] = ("train", FINISHED + [f"--data_dir={tfr}", f"--model_dir={r / 'finished'}"])
    return r, data, _run_all(jobs)


# The shortest finished run: one step, on every case, exported.
FINISHED = ["--epochs=1", "--steps_per_epoch=1", "--fold=-1"]


@pytest.fixture(scope="module")
def second_runs(root, train_runs):
    """Runs that follow train_runs': train.py again on the finished run (into
    which the temporaries of a save killed midway were put, and two folders
    of the user's of similar names), and the converter command that
    train.py's error for a NIfTI --data_dir gives."""
    r, _, runs = train_runs
    assert runs["finished"].returncode == 0, runs["finished"].stderr[-3000:]
    finished = r / "finished"
    before = _times(finished)
    (finished / "export" / ".1.tmp-k1lled00" / "variables").mkdir(parents=True)
    (finished / "export" / ".1.tmp-k1lled00" / "saved_model.pb").write_bytes(b"partial")
    (finished / ".model.keras.k1lled00.tmp.keras").write_bytes(b"partial")
    (finished / ".segmenter.keras.k1lled00.tmp.keras").write_bytes(b"partial")
    for mine in (finished / "export" / ".1.tmp-notes", finished / "export" / ".2.tmp-k1lled00"):
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
    line = _error_line(runs["nifti_data_dir"], "train.py: error:")
    command = re.search(
        r"python -m data_pipeline\.convert (--input_dir \S+ --output_dir \S+),", line
    )
    jobs = {
        "rerun": ("train", FINISHED + [f"--data_dir={root / 'tfr'}", f"--model_dir={finished}"])
    }
    if command:  # the test data have 4 cases, fewer than the default 5 folds
        jobs["hint"] = ("convert", command.group(1).split() + ["--folds=2"])
    return before, _run_all(jobs)


def _make_evaluate_inputs(root, model, r):
    """evaluate.py's faulty inputs under r: the input paths, and the truncated shard."""
    empty_manifest = _tfr_copy(root, r / "empty_manifest")
    (empty_manifest / "manifest.json").write_text("{}")
    truncated = _tfr_copy(root, r / "truncated")
    bad_shard = sorted(truncated.glob("*.tfrecord"))[1]
    bad_shard.write_bytes(bad_shard.read_bytes()[:-100])
    # the same, with a manifest that does not record the shards' sizes (the read must fail)
    unsized = _tfr_copy(root, r / "unsized")
    (unsized / bad_shard.name).write_bytes(bad_shard.read_bytes())
    manifest = _manifest(unsized)
    for shard in manifest["shards"]:
        del shard["bytes"]
    (unsized / "manifest.json").write_text(json.dumps(manifest))
    corrupt = r / "corrupt.keras"
    corrupt.write_bytes(model.read_bytes()[: len(model.read_bytes()) // 2])
    # A NIfTI folder holding an unrelated manifest.json, one case on a 2 mm grid,
    # and beside the output folder the staging folder of a killed evaluation and
    # someone's hidden folder of a similar name.
    nii = _nii_copy(root, r / "nii", 2)
    (nii / "manifest.json").write_text(json.dumps({"study": "unrelated"}))
    for path in _case_dirs(nii)[0].glob("*.nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([2.0, 1.0, 1.0, 1.0])), path)
    killed = r / ".out.tmp-k1lled00"
    (killed / "predictions").mkdir(parents=True)
    (killed / "predictions" / "case.nii.gz").write_bytes(b"partial")
    foreign = r / ".out.tmp-notmine0"
    foreign.mkdir()
    (foreign / "notes.txt").write_bytes(b"mine")
    # BraTS 2023 data: NIfTI files named so, and TFRecords whose manifest says so
    nii_2023 = _nii_2023(root, r / "nii_2023", 2)
    tfr_2023 = _tfr_copy(root, r / "tfr_2023")
    manifest = _manifest(tfr_2023)
    for case in manifest["cases"]:
        case["naming"] = "brats2023"
    (tfr_2023 / "manifest.json").write_text(json.dumps(manifest))
    inputs = (empty_manifest, truncated, unsized, corrupt, nii, nii_2023, tfr_2023)
    return inputs, bad_shard


def _evaluate_jobs(root, model, r, inputs):
    """evaluate.py's fault runs: {name: (script, arguments)}."""
    empty_manifest, truncated, unsized, corrupt, nii, nii_2023, tfr_2023 = inputs
    return {
        "empty_manifest": (
            "evaluate",
            [f"--model={model}", f"--data={empty_manifest}", f"--output_dir={r / 'o_empty'}"],
        ),
        "truncated_shard": (
            "evaluate",
            [f"--model={model}", f"--data={truncated}", f"--output_dir={r / 'o_trunc'}"],
        ),
        "truncated_unsized": (
            "evaluate",
            [f"--model={model}", f"--data={unsized}", f"--output_dir={r / 'o_unsized'}"],
        ),
        "corrupt_keras": (
            "evaluate",
            [f"--model={corrupt}", f"--data={root / 'tfr'}", f"--output_dir={r / 'o_corrupt'}"],
        ),
        "nifti": (
            "evaluate",
            [f"--model={model}", f"--data={nii}", f"--output_dir={r / 'out'}", "--nofigures"],
        ),
        "et_nifti_2023": (
            "evaluate",
            [
                f"--model={model}",
                f"--data={nii_2023}",
                f"--output_dir={r / 'et_nifti'}",
                "--nofigures",
            ],
        ),
        "et_tfr_2023": (
            "evaluate",
            [
                f"--model={model}",
                f"--data={tfr_2023}",
                "--fold=1",
                f"--output_dir={r / 'et_tfr'}",
                "--nofigures",
            ],
        ),
    }


@pytest.fixture(scope="module")
def evaluate_runs(root, model):
    """evaluate.py's fault runs, side by side."""
    r = root / "evaluate"
    r.mkdir()
    inputs, bad_shard = _make_evaluate_inputs(root, model, r)
    return r, bad_shard.name, _run_all(_evaluate_jobs(root, model, r, inputs))


# ------------------------------------------------------------------- train.py
def test_rerun_with_another_architecture_stops_before_writing(train_runs):
    """A rerun into a model_dir of another architecture stops with one line naming
    model_dir and the differing field, and leaves config.json and flags.txt as
    they were. Before: train.py wrote both first, then crashed restoring."""
    r, _, runs = train_runs
    line = _error_line(runs["other_architecture"], "train.py: error:")
    assert str(r / "earlier") in line and "init_filters 8 there, 16 now" in line, line
    assert "groups" not in line and "latent_dim" not in line  # only what differs
    assert sorted(_files(r / "earlier")) == ["config.json", "flags.txt"]
    assert (r / "earlier" / "flags.txt").read_text() == "--init_filters=8\n"
    assert json.loads((r / "earlier" / "config.json").read_text())["model"]["init_filters"] == 8


@pytest.mark.parametrize(
    "name,words",
    [
        ("truncated_shard", ["bytes", "truncated"]),  # before: a traceback after model_dir was made
        ("missing_shard", ["is missing"]),  # before: a traceback after model_dir was made
        ("empty_manifest", ["manifest.json", "converter_version"]),  # before: KeyError traceback
        ("invalid_json_manifest", ["manifest.json", "not valid JSON"]),  # before: no file named
        ("bad_tf_config", ["TF_CONFIG", "not valid JSON"]),  # before: a JSONDecodeError traceback
        ("too_many_steps", ["--steps_per_epoch=50", "has 4"]),  # before: ValueError after an epoch
    ],
)
def test_bad_data_or_environment_stops_train_before_writing(train_runs, name, words):
    r, data, runs = train_runs
    line = _error_line(runs[name], "train.py: error:")
    for word in words:
        assert word in line, line
    if name in data and name != "empty_manifest" and name != "invalid_json_manifest":
        assert str(data[name]) in line, line  # the shard's path
    elif name in data:
        assert str(data[name] / "manifest.json") in line, line
    assert not any(p.name.startswith("md_") for p in r.iterdir())  # no model_dir made


def test_empty_validation_fold_is_reported_by_the_converter_and_refused_by_train(
    converter_runs, train_runs
):
    """--skip_bad can leave a fold without cases: the converter says so (and
    records it in the manifest); train.py --fold=<that fold> stops before
    training. Before: silent exit 0, then a traceback after a full epoch."""
    conv, runs = converter_runs
    proc = runs["empty_fold"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    (fold,) = _manifest(conv / "ef")["empty_folds"]
    assert f"fold {fold} has no case" in proc.stderr
    line = _error_line(train_runs[2]["empty_fold"], "train.py: error:")
    assert f"fold {fold} of {conv / 'ef' / 'manifest.json'} has no case" in line, line


def test_shard_corrupt_in_place_is_named_and_model_dir_left_as_found(train_runs):
    """A training shard with 64 bytes inverted in its middle (its size, which
    the manifest records, unchanged): one line naming the shard and its case,
    without TensorFlow's internals; a model_dir the run made is removed again,
    an existing one keeps exactly what it had. Before: TensorFlow's
    DataLossError text ({{function_node __wrapped__IteratorGetNext...}}),
    naming the data folder only, and config.json, flags.txt and logs/ left
    in the model_dir."""
    r, data, runs = train_runs
    bad = sorted(data["corrupt_shard"].glob("brats-fold1-*.tfrecord"))[0]
    (case,) = next(
        s["cases"] for s in _manifest(data["corrupt_shard"])["shards"] if s["file"] == bad.name
    )
    for name in ("corrupt_shard", "corrupt_shard_existing"):
        line = _error_line(runs[name], "train.py: error:")
        assert f"shard {bad}:" in line and f"(case {case})" in line, line
        assert "function_node" not in line and "[Op:" not in line and "Error:" not in line, line
    assert not (r / "md_corrupt_shard").exists()
    assert _files(r / "existing") == _files(r / "earlier") | {"notes.txt": b"mine"}


def test_nifti_data_dir_gets_a_converter_command_it_accepts(root, train_runs, second_runs):
    """train.py --data_dir=<a folder of BraTS NIfTI cases> says so and gives the
    whole converter command, into a folder beside it; that command converts.
    Before: '--output_dir <that same NIfTI folder>', which the converter
    refuses (inside input_dir)."""
    line = _error_line(train_runs[2]["nifti_data_dir"], "train.py: error:")
    nii = root / "nii"
    assert "4 BraTS NIfTI case(s)" in line, line
    assert (
        f"python -m data_pipeline.convert --input_dir {nii} --output_dir {nii}_tfrecord, "
        f"then train with --data_dir={nii}_tfrecord"
    ) in line, line
    hint = second_runs[1]["hint"]
    assert hint.returncode == 0, hint.stderr[-3000:]
    assert _manifest(f"{nii}_tfrecord")["num_cases"] == 4


def test_rerun_of_a_finished_run_removes_only_its_own_stale_temporaries(train_runs, second_runs):
    """The temporaries of model.keras, segmenter.keras and export/1 that a save
    killed midway left are removed by the next run; folders of the user's with
    similar names (another pattern, another version) are kept. Before: the
    rerun wrote export/1 and left export/.1.tmp-* there."""
    finished = train_runs[0] / "finished"
    rerun = second_runs[1]["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (finished / "export" / ".1.tmp-k1lled00").exists()
    assert not list(finished.glob(".*.tmp.keras"))
    for mine in (".1.tmp-notes", ".2.tmp-k1lled00"):
        assert (finished / "export" / mine / "notes.txt").read_text() == "mine"
    assert "left by an interrupted save" in rerun.stderr


def test_rerun_of_a_finished_run_rewrites_nothing(train_runs, second_runs):
    """The same command again on a finished run: every file keeps its bytes and
    its time stamp. Before: model.keras, segmenter.keras and export/1 were
    written again, with other bytes."""
    finished = train_runs[0] / "finished"
    before, runs = second_runs
    assert runs["rerun"].returncode == 0, runs["rerun"].stderr[-3000:]
    after = {name: value for name, value in _times(finished).items() if "notes" not in name}
    assert sorted(after) == sorted(before) and "model.keras" in after
    for name in before:
        assert after[name] == before[name], name


# ------------------------------------------------------------------ converter
def test_intensity_beyond_float32_is_a_bad_case(converter_runs):
    """A float64 voxel beyond float32's range: one line naming case and file, nothing
    written. Before: stored as inf, exit 0, inf/nan statistics in the shard."""
    conv, runs = converter_runs
    line = _error_line(runs["overflow"], "error:")
    t1 = next((conv / "overflow_in").rglob("*_t1.nii.gz"))
    assert f"case {t1.parent.name}: file {t1}:" in line and "float32's range" in line, line
    assert not (conv / "of").exists()


def test_shards_are_byte_identical_across_processes(converter_runs):
    """Two processes convert the same input to the same bytes. Before: the
    Example's feature map was serialised in an order that changes per process."""
    conv, runs = converter_runs
    for name in ("same_a", "same_b"):
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    a, b = _files(conv / "same_a"), _files(conv / "same_b")
    assert sorted(a) == sorted(b) and len(a) > 2
    for name in a:
        if name.endswith(".tfrecord"):
            assert a[name] == b[name], name
    assert _manifest(conv / "same_a")["shards"] == _manifest(conv / "same_b")["shards"]


def test_output_folder_contents_it_did_not_write_are_kept(converter_runs):
    """Without --overwrite the converter deletes nothing it did not write: a
    folder with shards but no manifest is refused in one line; a hidden .tmp-
    file of someone else's is left alone. Before: both were deleted."""
    conv, runs = converter_runs
    line = _error_line(runs["stray"], "error:")
    assert str(conv / "stray") in line and "--overwrite" in line, line
    assert _files(conv / "stray") == {
        "brats-fold0-000-of-001.tfrecord": b"mine",
        ".tmp-notes": b"mine",
    }
    assert runs["foreign_tmp"].returncode == 0, runs["foreign_tmp"].stderr[-3000:]
    assert (conv / "foreign_tmp" / ".tmp-notes").read_bytes() == b"mine"


def test_output_dir_that_is_a_file_is_one_line(converter_runs):
    """Before: a FileExistsError traceback."""
    conv, runs = converter_runs
    line = _error_line(runs["output_is_file"], "error:")
    assert str(conv / "a_file") in line and "not a folder" in line, line
    assert (conv / "a_file").read_bytes() == b"mine"


def test_case_folder_not_matching_its_files_is_reported(converter_runs):
    """Before: the folder was skipped without a word."""
    conv, runs = converter_runs
    proc = runs["mismatch"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    renamed = next((conv / "mismatch_in").rglob("Renamed_Case"))
    warnings = [line for line in proc.stderr.splitlines() if "not named after their folder" in line]
    assert len(warnings) == 1 and "1 folder(s)" in warnings[0] and str(renamed) in warnings[0]
    assert _manifest(conv / "mm")["num_cases"] == 1


def test_skip_bad_deals_the_folds_over_the_cases_kept(root, converter_runs):
    """--skip_bad with a case that fails only when read: its four good cases in
    two folds of two, the shards and folds of a conversion of those four alone
    (same seed), the bad case listed. Before: folds dealt over all five, then
    the bad one dropped: three cases in fold 0, one in fold 1, exit 0."""
    conv, runs = converter_runs
    proc = runs["skip_folds"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest, alone = _manifest(conv / "sf"), _manifest(root / "tfr")
    assert sorted(c["fold"] for c in manifest["cases"]) == [0, 0, 1, 1]
    assert [s["case_id"] for s in manifest["skipped"]] == ["Brats18_SYN_0004_1"]
    assert "Brats18_SYN_0004_1_flair.nii.gz" in manifest["skipped"][0]["error"]
    assert manifest["shards"] == alone["shards"]
    assert (
        [dict(c, files=None) for c in manifest["cases"]]  # all but their source files
        == [dict(c, files=None) for c in alone["cases"]]
    )
    for shard in manifest["shards"]:
        assert (conv / "sf" / shard["file"]).read_bytes() == (
            root / "tfr" / shard["file"]
        ).read_bytes()
    assert sorted(p.name for p in (conv / "sf").iterdir()) == sorted(
        [s["file"] for s in manifest["shards"]] + ["manifest.json"]
    )  # no temporary left


# ----------------------------------------------------------------- evaluate.py
@pytest.mark.parametrize(
    "name,words",
    [
        ("empty_manifest", ["manifest.json", "converter_version"]),  # before: KeyError traceback
        ("corrupt_keras", ["corrupt.keras", "not a valid .keras file"]),  # before: "File not found"
    ],
)
def test_bad_input_to_evaluate_is_one_line(evaluate_runs, name, words):
    r, _, runs = evaluate_runs
    line = _error_line(runs[name], "evaluate.py: error:")
    for word in words:
        assert word in line, line
    assert "File not found" not in line
    assert not list(r.glob("o_*")) and not list(r.glob(".o_*"))


@pytest.mark.parametrize("name", ["truncated_shard", "truncated_unsized"])
def test_truncated_shard_is_named_alone(evaluate_runs, name):
    """The error names the truncated shard, not every shard read (before: the
    list of all shards; now the manifest's recorded size catches it before
    any inference, and a manifest without sizes fails on the read, naming
    that file)."""
    r, bad_shard, runs = evaluate_runs
    line = _error_line(runs[name], "evaluate.py: error:")
    others = [p.name for p in (r / "truncated").glob("*.tfrecord") if p.name != bad_shard]
    assert bad_shard in line and others and not any(o in line for o in others), line
    assert not list(r.glob("o_*")) and not list(r.glob(".o_*"))


def test_evaluate_says_what_it_accepts_and_cleans_what_a_killed_run_left(evaluate_runs):
    """A NIfTI folder with an unrelated manifest.json is read as NIfTI cases (before:
    KeyError 'shards'); a case not on a 1 mm grid gets a warning with a count
    (before: silence); the staging folder of a killed evaluation into the same
    output is removed, someone's similar folder is kept (before: both kept)."""
    r, _, runs = evaluate_runs
    proc = runs["nifti"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not the converter's" in proc.stderr
    warnings = [
        line for line in proc.stderr.splitlines() if "voxel spacing other than 1 mm" in line
    ]
    assert len(warnings) == 1 and "1 of 2 case(s)" in warnings[0] and "2 x 1 x 1" in warnings[0]
    record = json.loads((r / "out" / "evaluation.json").read_text())
    assert list(record["spacing_not_1mm"].values()) == [[2.0, 1.0, 1.0]]
    assert not (r / ".out.tmp-k1lled00").exists()
    assert (r / ".out.tmp-notmine0" / "notes.txt").read_bytes() == b"mine"


def _labels_written(out):
    return set(
        np.unique(
            np.concatenate(
                [np.asarray(nib.load(p).dataobj).ravel() for p in (out / "predictions").iterdir()]
            )
        )
    )


def _check_et_label(proc, out, et_label, source):
    """ET written as et_label, the protocol of both JSON files says so and why, the log too."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _labels_written(out) == {0, 1, 2, et_label}
    for record in ("summary.json", "evaluation.json"):
        protocol = json.loads((out / record).read_text())["protocol"]
        assert (protocol["et_label"], protocol["et_label_source"]) == (et_label, source)
    assert f"ET written as {et_label}: {source}" in proc.stderr


@pytest.mark.parametrize(
    "name,out",
    [
        ("et_nifti_2023", "et_nifti"),  # the files' names
        ("et_tfr_2023", "et_tfr"),
    ],
)  # the manifest's cases
def test_et_label_follows_the_datas_naming(evaluate_runs, name, out):
    """BraTS 2023 data get ET as 3 by default (--et_label given overrides it:
    the test below), and the protocol records which and why. Before: 4
    unless --et_label=3 was given (a 2023 submission made with the defaults
    carried the wrong label)."""
    r, _, runs = evaluate_runs
    _check_et_label(runs[name], r / out, 3, "the data's BraTS 2023 naming")


def _kill_evaluation_after_a_case(args, staging):
    """Runs evaluate.py with args, kills it (-9) once a case is done: its stderr."""
    child = subprocess.Popen(
        _command("evaluate", args),
        cwd=ROOT,
        env=ENV,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 300
        while not list(staging.glob("cases_done/*.json")):
            assert child.poll() is None and time.time() < deadline, "ended before a case"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return stderr


def test_killed_evaluation_resumes_at_the_first_case_not_written(root, model):
    """evaluate.py killed (-9) after its first case: the staging folder is
    <output_dir>.partial, named in the log; the same command again resumes
    there (the cases done are not computed again), a command of another
    protocol (--et_label=3, which overrides the data's 2018 naming) starts
    over and says so, and both end with the same scores. Before: a hidden
    .<output>.tmp-* folder, removed by the rerun, which started again from
    the first case."""
    r = root / "resume"
    r.mkdir()
    args = [f"--model={model}", f"--data={root / 'tfr'}", f"--output_dir={r / 'out'}"]
    staging = r / "out.partial"
    stderr = _kill_evaluation_after_a_case(args, staging)
    assert f"writing into {staging}" in stderr
    done = sorted(p.stem for p in staging.glob("cases_done/*.json"))
    assert 1 <= len(done) < 4, "killed too late to test a resume"
    kept = {
        f"predictions/{case}.nii.gz": (staging / "predictions" / f"{case}.nii.gz")
        .stat()
        .st_mtime_ns
        for case in done
    }
    shutil.copytree(staging, r / "other.partial")  # the same, for an evaluation of another protocol
    runs = _run_all(
        {
            "same": ("evaluate", args),
            "other": ("evaluate", args[:2] + [f"--output_dir={r / 'other'}", "--et_label=3"]),
        }
    )
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"resuming the interrupted evaluation in {staging}: {len(done)} case(s)"
        in runs["same"].stderr
    )
    assert f"starting over: {r / 'other.partial'}" in runs["other"].stderr
    assert not staging.exists() and not (r / "other.partial").exists()
    for name, mtime in kept.items():
        assert (r / "out" / name).stat().st_mtime_ns == mtime  # not written again
        assert (r / "other" / name).stat().st_mtime_ns != mtime
    assert (r / "out" / "per_case.csv").read_text() == (r / "other" / "per_case.csv").read_text()
    _check_et_label(runs["other"], r / "other", 3, "--et_label")
    _check_et_label(runs["same"], r / "out", 4, "the data's BraTS 2018-2021 naming")
    assert len(json.loads((r / "out" / "evaluation.json").read_text())["written"]) == 4 + 4 + 3


# --------------------------------------------------------------------- client
class _HtmlReply(http.server.BaseHTTPRequestHandler):
    """A server that answers with an HTML page (a proxy's, say), not JSON."""

    def do_POST(self):  # the name http.server calls
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"<html><body>Bad gateway</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_client_names_the_server_of_a_reply_that_is_not_json(root, tmp_path):
    """Before: 'Expecting value: line 1 column 1 (char 0)', no server named."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _HtmlReply)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        proc = _run(
            "client",
            [
                f"--case_dir={_case_dirs(root / 'nii')[0]}",
                f"--output_dir={tmp_path}",
                f"--server={url}",
            ],
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    line = _error_line(proc, "serving.client: error:")
    assert f"{url}/v1/models/brats:predict" in line and "not JSON" in line, line
    assert not list(tmp_path.iterdir())
