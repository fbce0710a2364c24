"""evaluate.py end to end on tiny untrained models over synthetic TFRecords and NIfTI folders.

Runs evaluate.main in-process (absl FLAGS parsed per call), plus one real
subprocess for the command line's exit status and stderr.
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from importtime import imported_modules

import evaluate
from benchmarks.reduced_precision import slack
from brats_tf import evaluation, metrics, training
from brats_tf.config import ModelConfig
from brats_tf.model import build_model
from data_pipeline import constants
from data_pipeline.convert import convert
from data_pipeline.manifest import read_manifest
from data_pipeline.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPE = (48, 48, 40)
NUM_CASES = 3
TINY = dict(
    input_shape=(32, 32, 32), init_filters=8, latent_dim=16, blocks_down=(1, 1), blocks_up=(1,)
)
COLUMNS = ["case_id"] + [
    f"{r}_{m}"
    for r in ("WT", "TC", "ET")
    for m in ("dice", "hd95", "sensitivity", "specificity", "pred_volume_ml", "true_volume_ml")
]
# figure size for 48x48x40: panel side 48 enlarged x ceil(200 / 48) = 5 -> 240 px;
# width 3 panels + 4 gaps of 4 px; height: caption row (14 + 8) + 2 x (row title 22 +
# panel 240 + gap 4) + legend (14 + 12).
FIGURE_HW = {
    2: (22 + 2 * (22 + 240 + 4) + 26, 3 * 240 + 16),
    1: (22 + 1 * (22 + 240 + 4) + 26, 3 * 240 + 16),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(str(root / "nii"), NUM_CASES, shape=SHAPE, seed=0, progress=False)
    convert(
        str(root / "nii"), str(root / "tfr"), cases_per_shard=1, folds=3, seed=0, progress=False
    )
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model_dir with model.keras, segmenter.keras and export/1 (0 training steps)."""
    root = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(1)
    model = build_model(ModelConfig(**TINY))
    (root / "md").mkdir()
    training.save_final(model, str(root / "md"))
    # a model_dir holding only a checkpoint and config.json, as train.py writes them
    ckpt_dir = root / "ckpt_md"
    tf.train.Checkpoint(model=model).save(str(ckpt_dir / "checkpoints" / "ckpt"))
    (ckpt_dir / "config.json").write_text(
        json.dumps({"model": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}})
    )
    three = build_model(ModelConfig(**TINY, in_channels=3))
    three.save(str(root / "three_channels.keras"))
    return root


def run(args, capsys):
    """evaluate.main on ``args``: (exit code, stdout, stderr)."""
    evaluate.FLAGS.unparse_flags()
    evaluate.FLAGS(["evaluate.py", "--noprogress"] + [str(a) for a in args])
    code = 0
    try:
        evaluate.main(["evaluate.py"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def nifti_case_dirs(nii_dir):
    return sorted(p for p in pathlib.Path(nii_dir).glob("*/*") if p.is_dir())


@pytest.mark.parametrize("source", ["tfr", "nii"])
def test_end_to_end(source, data, models, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, stderr = run(
        [f"--model={models / 'md'}", f"--data={data / source}", f"--output_dir={out}"], capsys
    )
    assert code == 0, stderr
    # one-line summary with every region's mean Dice and HD95
    assert stdout.count("\n") == 1 and all(f"{r} Dice" in stdout for r in ("WT", "TC", "ET"))

    case_dirs = nifti_case_dirs(data / "nii")
    ids = sorted(p.name for p in case_dirs)
    rows = read_csv(out / "per_case.csv")
    assert list(rows[0]) == COLUMNS
    assert sorted(r["case_id"] for r in rows) == ids

    # summary statistics recomputed with numpy from the per-case CSV
    summary = json.loads((out / "summary.json").read_text())["summary"]
    summary_csv = {r["statistic"]: r for r in read_csv(out / "summary.csv")}
    for column in COLUMNS[1:]:
        values = np.array([float(r[column]) for r in rows])
        region, metric = column.split("_", 1)
        expected = {
            "mean": values.mean(),
            "std": values.std(ddof=0),
            "median": np.median(values),
            "25quantile": np.percentile(values, 25),
            "75quantile": np.percentile(values, 75),
        }
        for stat, value in expected.items():
            assert summary[region][metric][stat] == pytest.approx(value, rel=1e-9, abs=1e-12)
            assert float(summary_csv[stat][column]) == pytest.approx(value, rel=1e-9, abs=1e-12)

    for case_dir in case_dirs:
        cid = case_dir.name
        pred = nib.load(str(out / "predictions" / f"{cid}.nii.gz"))
        ref = nib.load(str(case_dir / f"{cid}_t1.nii.gz"))
        assert pred.shape == ref.shape == SHAPE
        np.testing.assert_allclose(pred.affine, ref.affine)
        labels = np.asarray(pred.dataobj)
        assert pred.get_data_dtype() == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 4}
        # the CSV scores exactly the written prediction against the seg file
        truth = np.asarray(nib.load(str(case_dir / f"{cid}_seg.nii.gz")).dataobj)
        scores = metrics.case_metrics(labels, truth, ref.header.get_zooms()[:3])
        row = next(r for r in rows if r["case_id"] == cid)
        for region in constants.REGIONS:
            for metric in metrics.METRICS:
                assert float(row[f"{region}_{metric}"]) == pytest.approx(scores[region][metric])
        png = tf.io.decode_png(tf.io.read_file(str(out / "figures" / f"{cid}.png"))).numpy()
        assert png.shape == FIGURE_HW[2] + (3,)
    written = json.loads((out / "evaluation.json").read_text())["written"]
    assert sorted(written) == sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.name != "evaluation.json"
    )
    assert not list(tmp_path.glob(".eval*")) and not (tmp_path / "eval.partial").exists()


def test_tfrecords_and_nifti_give_the_same_scores(data, models, tmp_path, capsys):
    # the inference model on one, the training model (VAE dropped) on the other
    for source, name in (("tfr", "segmenter.keras"), ("nii", "model.keras")):
        code, _, err = run(
            [
                f"--model={models / 'md' / name}",
                f"--data={data / source}",
                f"--output_dir={tmp_path / source}",
                "--nofigures",
            ],
            capsys,
        )
        assert code == 0, err
    a = {r["case_id"]: r for r in read_csv(tmp_path / "tfr" / "per_case.csv")}
    b = {r["case_id"]: r for r in read_csv(tmp_path / "nii" / "per_case.csv")}
    assert a.keys() == b.keys()
    for cid in a:
        for column in COLUMNS[1:]:
            assert float(a[cid][column]) == pytest.approx(float(b[cid][column]), abs=1e-6)


def test_fold_selects_that_folds_cases(data, models, tmp_path, capsys):
    manifest = read_manifest(str(data / "tfr"))
    fold = manifest["shards"][0]["fold"]
    expected = sorted(
        c if isinstance(c, str) else c["case_id"]
        for s in manifest["shards"]
        if s["fold"] == fold
        for c in s["cases"]
    )
    code, _, err = run(
        [
            f"--model={models / 'md'}",
            f"--data={data / 'tfr'}",
            f"--fold={fold}",
            f"--output_dir={tmp_path / 'o'}",
            "--nofigures",
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(r["case_id"] for r in read_csv(tmp_path / "o" / "per_case.csv")) == expected


@pytest.fixture(scope="module")
def nii_2023(data, tmp_path_factory):
    """The synthetic cases in the BraTS 2023 layout: -t1n/-t1c/-t2w/-t2f, ET written as 3."""
    root = tmp_path_factory.mktemp("nii2023")
    names = dict(zip(constants.MODALITIES, constants.MODALITIES_2023), seg="seg")
    for case_dir in nifti_case_dirs(data / "nii"):
        cid = case_dir.name.replace("Brats18_SYN", "BraTS-GLI")
        (root / cid).mkdir()
        for old, new in names.items():
            img = nib.load(str(case_dir / f"{case_dir.name}_{old}.nii.gz"))
            array = np.asarray(img.dataobj)
            if old == "seg":
                array = np.where(array == 4, 3, array).astype(array.dtype)
            nib.save(
                nib.Nifti1Image(array, img.affine, img.header),
                str(root / cid / f"{cid}-{new}.nii.gz"),
            )
    return root


def test_brats2023_labels(data, nii_2023, models, tmp_path, capsys):
    args = [f"--model={models / 'md'}", "--nofigures"]
    assert run(args + [f"--data={data / 'nii'}", f"--output_dir={tmp_path / 'a'}"], capsys)[0] == 0
    code, _, err = run(
        args + [f"--data={nii_2023}", f"--output_dir={tmp_path / 'b'}", "--et_label=3"], capsys
    )
    assert code == 0, err
    a = {
        r.pop("case_id").replace("Brats18_SYN", "BraTS-GLI"): r
        for r in read_csv(tmp_path / "a" / "per_case.csv")
    }
    b = {r.pop("case_id"): r for r in read_csv(tmp_path / "b" / "per_case.csv")}
    assert a == b  # same cases, same scores, labels only renamed
    for cid in b:
        p4 = np.asarray(
            nib.load(
                str(
                    tmp_path
                    / "a"
                    / "predictions"
                    / f"{cid.replace('BraTS-GLI', 'Brats18_SYN')}.nii.gz"
                )
            ).dataobj
        )
        p3 = np.asarray(nib.load(str(tmp_path / "b" / "predictions" / f"{cid}.nii.gz")).dataobj)
        assert (p4 == 4).any()  # the untrained model predicts some ET: the test can fail
        np.testing.assert_array_equal(p3, np.where(p4 == 4, 3, p4))


@pytest.mark.parametrize(
    "second,tta", [("md", False), ("ckpt_md", False), ("ckpt_prefix", False), ("export", True)]
)
def test_model_kinds_and_ensembles_equal_one_model(second, tta, data, models, tmp_path, capsys):
    """An ensemble of identical models = one model; a SavedModel (raw input, normalising
    inside) and a checkpoint model_dir give the probabilities of the .keras model."""
    path = {
        "md": models / "md",
        "export": models / "md" / "export" / "1",
        "ckpt_md": models / "ckpt_md",
        "ckpt_prefix": models / "ckpt_md" / "checkpoints" / "ckpt-1",
    }[second]
    common = [
        f"--data={data / 'tfr'}",
        "--fold=0",
        "--save_probabilities",
        "--nofigures",
        f"--tta={tta}",
    ]
    assert (
        run([f"--model={models / 'md'}", f"--output_dir={tmp_path / 'one'}"] + common, capsys)[0]
        == 0
    )
    code, _, err = run(
        [f"--model={models / 'md'},{path}", f"--output_dir={tmp_path / 'two'}"] + common, capsys
    )
    assert code == 0, err
    for f in sorted((tmp_path / "one" / "probabilities").iterdir()):
        p1 = np.asarray(nib.load(str(f)).dataobj)
        p2 = np.asarray(nib.load(str(tmp_path / "two" / "probabilities" / f.name)).dataobj)
        assert p1.shape == SHAPE + (3,)
        np.testing.assert_allclose(p2, p1, atol=1e-5)
    for f in sorted((tmp_path / "one" / "predictions").iterdir()):
        l1 = np.asarray(nib.load(str(f)).dataobj)
        l2 = np.asarray(nib.load(str(tmp_path / "two" / "predictions" / f.name)).dataobj)
        assert (l1 != l2).mean() < 1e-4  # only voxels within 1e-5 of the threshold may differ


def test_no_labels_gives_predictions_only(data, models, tmp_path, capsys):
    nii = tmp_path / "val"
    shutil.copytree(data / "nii", nii)
    for seg in nii.rglob("*_seg.nii.gz"):
        seg.unlink()
    out = tmp_path / "o"
    code, stdout, err = run(
        [f"--model={models / 'md'}", f"--data={nii}", f"--output_dir={out}"], capsys
    )
    assert code == 0, err
    assert "without labels" in stdout
    assert not (out / "per_case.csv").exists() and not (out / "summary.json").exists()
    assert len(list((out / "predictions").glob("*.nii.gz"))) == NUM_CASES
    png = tf.io.decode_png(tf.io.read_file(str(next((out / "figures").glob("*.png"))))).numpy()
    assert png.shape == FIGURE_HW[1] + (3,)


def _break(kind, data, models, tmp_path):
    """Makes one bad input; returns (args, the name the error must quote)."""
    nii = tmp_path / "nii"
    shutil.copytree(data / "nii", nii)
    case = nifti_case_dirs(nii)[1]
    model = models / "md"
    if kind == "wrong_channels":
        model = models / "three_channels.keras"
        return [f"--model={model}", f"--data={nii}"], str(model)
    if kind == "missing_modality":
        path = case / f"{case.name}_t1ce.nii.gz"
        path.unlink()
        return [f"--model={model}", f"--data={nii}"], str(path)
    if kind == "unreadable_nifti":
        path = case / f"{case.name}_flair.nii.gz"
        path.write_bytes(b"not a nifti file")
        return [f"--model={model}", f"--data={nii}"], str(path)
    if kind == "missing_model":
        path = tmp_path / "no_such_model"
        return [f"--model={model},{path}", f"--data={nii}"], str(path)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["wrong_channels", "missing_modality", "unreadable_nifti", "missing_model"]
)
def test_bad_input_is_one_line_and_leaves_nothing(kind, data, models, tmp_path, capsys):
    args, name = _break(kind, data, models, tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = run(args + [f"--output_dir={out}"], capsys)
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.startswith("evaluate.py: error:")]
    assert len(lines) == 1 and name in lines[0], stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out.partial"))]


@pytest.mark.parametrize("where", ["data", "inside_data"])
def test_output_dir_in_data_dir_is_refused(where, data, models, tmp_path, capsys):
    nii = tmp_path / "nii"
    shutil.copytree(data / "nii", nii)
    out = nii if where == "data" else nii / "HGG" / "preds"
    before = sorted(p for p in nii.rglob("*"))
    code, _, stderr = run(
        [f"--model={models / 'md'}", f"--data={nii}", f"--output_dir={out}"], capsys
    )
    assert code != 0 and "output_dir" in stderr and str(nii) in stderr
    assert sorted(p for p in nii.rglob("*")) == before


def test_non_empty_output_dir_needs_overwrite(data, models, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [
        f"--model={models / 'md'}",
        f"--data={data / 'tfr'}",
        f"--output_dir={out}",
        "--nofigures",
    ]
    code, _, stderr = run(args + ["--overwrite"], capsys)  # not an earlier evaluation: kept
    assert code != 0 and str(out) in stderr and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run(args, capsys)[0] == 0  # empty: fine
    code, _, stderr = run(args, capsys)
    assert code != 0 and "--overwrite" in stderr
    assert run(args + ["--overwrite"], capsys)[0] == 0
    assert len(read_csv(out / "per_case.csv")) == NUM_CASES


def test_precision_applies_to_keras_models_and_is_refused_for_a_saved_model(
    data, models, tmp_path, capsys
):
    base = [f"--data={data / 'tfr'}", "--nofigures", "--precision=mixed_bfloat16"]
    out = tmp_path / "bf16"
    code, _, stderr = run(base + [f"--model={models / 'md'}", f"--output_dir={out}"], capsys)
    assert code == 0, stderr
    record = json.loads((out / evaluation.RUN_JSON).read_text())
    assert record["config"]["precision"] == "mixed_bfloat16"
    assert record["models"][0]["precision"] == "mixed_bfloat16"
    assert len(read_csv(out / "per_case.csv")) == NUM_CASES
    # The probabilities are float32's within bfloat16's precision.
    case = next(iter(evaluation.open_cases(str(data / "tfr"))[0]))
    want = evaluation.load_model(models / "md").predict(case.image, tta=False)
    got = evaluation.load_model(models / "md", "mixed_bfloat16").predict(case.image, tta=False)
    assert 0 < np.abs(got - want).max() < 0.06 * slack("bfloat16")
    saved_model = models / "md" / "export" / "1"
    code, _, stderr = run(
        base + [f"--model={saved_model}", f"--output_dir={tmp_path / 'o'}"], capsys
    )
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and len(errors) == 1, stderr
    assert str(saved_model) in errors[0] and "exported with" in errors[0]
    assert not (tmp_path / "o").exists()


def test_validation_reuses_one_traced_network(data):
    """train.py validates every few epochs: the inference model (and with it
    predict_volume's traced graph) is made once per training model, and still
    sees the training model's current weights."""
    from brats_tf.evaluation.cases import _tfrecord_source
    from brats_tf.inference.predict import _GRAPH_FNS
    from brats_tf.training.validation import _SEGMENTERS, validation_dice

    keras.utils.set_random_seed(3)
    model = build_model(ModelConfig(**TINY))
    files, _, _ = _tfrecord_source(str(data / "tfr"), None)
    first = validation_dice(model, files)
    segmenter = _SEGMENTERS[model]
    assert validation_dice(model, files) == first
    assert _SEGMENTERS[model] is segmenter
    (fn,) = _GRAPH_FNS[segmenter].values()
    assert fn.experimental_get_tracing_count() == 1  # 2 validations x 3 cases
    assert {id(v) for v in segmenter.weights} <= {id(v) for v in model.weights}


def _evaluate_command(args, python_flags=()):
    """evaluate.py run with ``args``: (the process, its lines starting with
    "evaluate.py")."""
    proc = subprocess.run(
        [sys.executable, *python_flags, str(ROOT / "evaluate.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return proc, [line for line in proc.stderr.splitlines() if line.startswith("evaluate.py")]


def test_command_line_exit_status_and_one_line_error(data, tmp_path):
    missing = tmp_path / "missing_model"
    proc, errors = _evaluate_command(
        [f"--model={missing}", f"--data={data / 'tfr'}", f"--output_dir={tmp_path / 'o'}"]
    )
    assert proc.returncode == 1
    assert errors == [f"evaluate.py: error: model {missing}: no such file or directory"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fault", ["empty_manifest", "fold_out_of_range", "missing_modality"])
def test_a_bad_data_folder_is_answered_before_tensorflow(data, tmp_path, fault):
    """The data folder is checked before TensorFlow is imported: one line,
    nothing written (the model path is not even looked at yet)."""
    folder, args = tmp_path / "data", []
    if fault == "missing_modality":
        shutil.copytree(data / "nii", folder)
        t1ce = sorted(folder.rglob("*_t1ce.nii.gz"))[0]
        t1ce.unlink()
        message = f"{t1ce.name}"
    else:
        shutil.copytree(data / "tfr", folder)
        if fault == "empty_manifest":
            (folder / "manifest.json").write_text("{}")
            message = f"data {folder}:"
        else:
            args, message = ["--fold=7"], f"fold must be in [0, 3) for {folder}, got 7"
    proc, errors = _evaluate_command(
        ["--model=nowhere", f"--data={folder}", f"--output_dir={tmp_path / 'o'}", *args],
        python_flags=("-X", "importtime"),  # every module imported, one line each
    )
    assert proc.returncode == 1
    assert len(errors) == 1 and errors[0].startswith("evaluate.py: error:"), proc.stderr[-2000:]
    assert message in errors[0]
    assert "tensorflow" not in imported_modules(proc.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(models=()), "models"),
        (dict(et_label=2), "et_label"),
        (dict(threshold=1.5), "threshold"),
        (dict(hd95_mode="mean"), "hd95_mode"),
        (dict(fold=-1), "fold"),
        (dict(precision="bfloat16"), "precision"),
        (dict(et_min_voxels=-1), "et_min_voxels"),
        (dict(et_min_voxels=2.5), "et_min_voxels"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    base = dict(models=("m",), data="d", output_dir="o")
    with pytest.raises(ValueError, match=message):
        evaluation.EvalConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "affine,expected",
    [
        (np.diag([1.0, 1.0, 1.0, 1.0]), (1.0, 1.0, 1.0)),
        (np.diag([-1.0, -1.0, 1.0, 1.0]), (1.0, 1.0, 1.0)),
        (np.diag([0.5, 2.0, 3.0, 1.0]), (0.5, 2.0, 3.0)),
        (
            np.array([[0, 0, 2.0, 5], [0, -1.5, 0, 1], [3.0, 0, 0, 2], [0, 0, 0, 1]]),
            (3.0, 1.5, 2.0),
        ),
    ],
)
def test_spacing_from_affine(affine, expected):
    assert evaluation.spacing_from_affine(affine) == pytest.approx(expected)


# ------------------------------------------- post-processing, protocol, ensembles
def _labels(out):
    return {
        f.name: np.asarray(nib.load(str(f)).dataobj)
        for f in sorted((out / "predictions").iterdir())
    }


def test_et_post_processing_and_the_protocol_on_record(data, models, tmp_path, capsys):
    common = [f"--model={models / 'md'}", f"--data={data / 'tfr'}", "--nofigures"]
    assert run(common + [f"--output_dir={tmp_path / 'plain'}"], capsys)[0] == 0
    plain = _labels(tmp_path / "plain")
    counts = sorted(int((labels == 4).sum()) for labels in plain.values())
    assert counts[-1] > counts[0] > 0  # the untrained model predicts ET of several sizes
    n = counts[-1]  # every case but the largest ET loses its ET
    code, stdout, err = run(
        common + [f"--output_dir={tmp_path / 'post'}", f"--et_min_voxels={n}"], capsys
    )
    assert code == 0, err
    assert f"ET < {n} voxels -> NCR" in stdout
    post = _labels(tmp_path / "post")
    changed = 0
    for name, before in plain.items():
        expected = before.copy()
        if (before == 4).sum() < n:  # hand-written rule: ET -> 1, nothing else changes
            expected[before == 4] = 1
            changed += 1
        np.testing.assert_array_equal(post[name], expected)
    assert changed == len(plain) - 1
    # ET Dice of the changed cases: 1 where the truth has no ET, else 0
    rows = {r["case_id"]: r for r in read_csv(tmp_path / "post" / "per_case.csv")}
    plain_rows = {r["case_id"]: r for r in read_csv(tmp_path / "plain" / "per_case.csv")}
    for case_id, row in rows.items():
        assert row["WT_dice"] == plain_rows[case_id]["WT_dice"]
        assert row["TC_dice"] == plain_rows[case_id]["TC_dice"]
    for name in ("plain", "post"):
        record = json.loads((tmp_path / name / evaluation.RUN_JSON).read_text())
        summary = json.loads((tmp_path / name / evaluation.SUMMARY_JSON).read_text())
        assert record["protocol"] == summary["protocol"]
        assert record["protocol"] == {
            "region": "brain_box",
            "tta": "none",
            "ensemble_size": 1,
            "threshold": 0.5,
            "et_min_voxels": n if name == "post" else 0,
            "post_processing": (
                f"ET below {n} voxels -> necrosis (label 1)" if name == "post" else "none"
            ),
            "padding": "zeros to a multiple of 8, split evenly (odd voxel after)",
            "et_label": 4,
            "et_label_source": "the data's BraTS 2018-2021 naming",
        }


def test_protocol_region_follows_what_ran(data, models, tmp_path, capsys):
    """--crop_to_brain=false is the paper's whole volume for Keras models; a
    SavedModel runs as it was exported (here on the brain box)."""
    saved = models / "md" / "export" / "1"
    common = [f"--data={data / 'tfr'}", "--fold=0", "--nofigures", "--nocrop_to_brain", "--tta"]
    regions = {}
    for name, model in [
        ("keras", models / "md"),
        ("saved", saved),
        ("both", f"{models / 'md'},{saved}"),
    ]:
        out = tmp_path / name
        code, _, err = run(common + [f"--model={model}", f"--output_dir={out}"], capsys)
        assert code == 0, err
        protocol = json.loads((out / evaluation.SUMMARY_JSON).read_text())["protocol"]
        assert protocol["tta"] == "8 mirror flips"
        regions[name] = (protocol["region"], protocol["ensemble_size"])
    assert regions == {
        "keras": ("whole_volume", 1),
        "saved": ("brain_box", 1),
        "both": ("mixed: brain_box, whole_volume", 2),
    }


def _member(root, name, models, seed, fold=0, dice=(0.9, 0.8, 0.6)):
    """A copy of the tiny model_dir with a train.py config.json of ``seed`` and
    a history.json whose last epoch has the training Dice ``dice`` (WT, TC, ET)."""
    member = root / name
    shutil.copytree(models / "md", member)
    (member / "config.json").write_text(
        json.dumps(
            {
                "model": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                "train": {"seed": seed, "num_train_cases": 2},
                "data": {"fold": fold, "member": None},
            }
        )
    )
    (member / "history.json").write_text(
        json.dumps(
            [
                {"epoch": 1, "dice_WT": 0.0, "dice_TC": 0.0, "dice_ET": 0.0},
                {"epoch": 2, **{f"dice_{r}": d for r, d in zip(("WT", "TC", "ET"), dice)}},
            ]
        )
    )
    return member


def test_member_patterns_and_equal_seed_warnings(data, models, tmp_path, capsys, caplog):
    ens = tmp_path / "ens"
    _member(ens, "member_0", models, seed=0)
    _member(ens, "member_1", models, seed=1)
    _member(ens, "member_2", models, seed=1)  # the same seed and split as member_1
    common = [f"--data={data / 'tfr'}", "--fold=1", "--nofigures"]
    code, stdout, err = run(
        common + [f"--model={ens}/member_[01]", f"--output_dir={tmp_path / 'a'}"], capsys
    )
    assert code == 0, err
    record = json.loads((tmp_path / "a" / evaluation.RUN_JSON).read_text())
    assert [m["path"] for m in record["models"]] == [
        str(ens / f"member_{k}" / "segmenter.keras") for k in (0, 1)
    ]
    assert [m["seed"] for m in record["models"]] == [0, 1]
    assert record["warnings"] == [] and record["protocol"]["ensemble_size"] == 2
    assert "2 models" in stdout
    code, _, err = run(
        common + [f"--model={ens}/member_*,{ens / 'member_0'}", f"--output_dir={tmp_path / 'b'}"],
        capsys,
    )
    assert code == 0, err
    warnings = json.loads((tmp_path / "b" / evaluation.RUN_JSON).read_text())["warnings"]
    assert len(warnings) == 2, warnings
    assert "member_1" in warnings[0] and "member_2" in warnings[0] and "seed 1" in warnings[0]
    assert "member_0" in warnings[1] and "same file" in warnings[1]
    assert "same seed 1" in caplog.text  # logged too
    code, _, err = run(
        common + [f"--model={ens}/member_9*", f"--output_dir={tmp_path / 'c'}"], capsys
    )
    assert code != 0 and f"model {ens}/member_9*: the pattern matches no file or folder" in err
    assert not (tmp_path / "c").exists()


def test_a_member_that_has_not_learned_a_region_is_warned_of(data, models, tmp_path, capsys):
    """A member whose last training epoch ends with a region's Dice below
    training.UNLEARNED_DICE (a saturated channel) is named in the warnings."""
    ens = tmp_path / "ens"
    _member(ens, "member_0", models, seed=0)
    _member(ens, "member_1", models, seed=1, dice=(0.95, 0.002, 0.7))
    _member(ens, "member_2", models, seed=2, dice=(0.95, 0.8, 0.099))
    code, _, err = run(
        [
            f"--data={data / 'tfr'}",
            "--fold=1",
            "--nofigures",
            f"--model={ens}/member_*",
            f"--output_dir={tmp_path / 'o'}",
        ],
        capsys,
    )
    assert code == 0, err
    warnings = json.loads((tmp_path / "o" / evaluation.RUN_JSON).read_text())["warnings"]
    assert warnings == [
        f"model {ens / 'member_1' / 'segmenter.keras'} has not learned TC: training Dice "
        f"0.002 in its last epoch (a channel saturated early in training); leave it out of "
        f"the ensemble",
        f"model {ens / 'member_2' / 'segmenter.keras'} has not learned ET: training Dice "
        f"0.099 in its last epoch (a channel saturated early in training); leave it out of "
        f"the ensemble",
    ]
