"""The ET post-processing (volume / graph versions), its chooser
(brats_tf.evaluation.et_threshold) and its command brats_tf.postprocess."""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_data import synthetic_tfrecords

from brats_tf import evaluation, inference
from brats_tf.config import ModelConfig
from brats_tf.evaluation import et_threshold
from brats_tf.model import build_model
from data_pipeline import constants, volume

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(
    input_shape=(32, 32, 32), init_filters=8, latent_dim=16, blocks_down=(1, 1), blocks_up=(1,)
)


def _case(et_voxels, shape=(6, 7, 5), et_label=4):
    """A label map with ED, necrosis and ``et_voxels`` ET voxels (hand-placed)."""
    labels = np.zeros(shape, np.uint8)
    labels[0, :, :] = 2
    labels[1, :3, :] = 1
    flat = labels.reshape(-1)
    start = 2 * shape[1] * shape[2]
    flat[start : start + et_voxels] = et_label
    return labels


@pytest.mark.parametrize("et_label", [4, 3])
def test_et_to_necrosis_by_hand(et_label):
    labels = _case(3, et_label=et_label)
    for n, changes in [(0, False), (3, False), (4, True), (100, True)]:
        out = volume.et_to_necrosis(labels, n, et_label)
        expected = labels.copy()
        if changes:
            expected[labels == et_label] = 1
        np.testing.assert_array_equal(out, expected)
        assert out.dtype == np.uint8
    np.testing.assert_array_equal(
        volume.et_to_necrosis(labels, 4, et_label)[labels != et_label], labels[labels != et_label]
    )
    none = _case(0, et_label=et_label)
    np.testing.assert_array_equal(volume.et_to_necrosis(none, 10, et_label), none)
    assert labels[labels == et_label].size == 3  # the input is left alone


def test_et_to_necrosis_rejects_bad_values():
    for bad in (-1, 2.0, True, "5"):
        with pytest.raises(ValueError, match="et_min_voxels"):
            volume.et_to_necrosis(_case(1), bad)
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        volume.et_to_necrosis(_case(1)[None], 2)


def test_graph_version_is_per_case_and_equals_numpy():
    batch = np.stack([_case(k) for k in (0, 2, 5, 9)])
    for n in (0, 3, 6, 10):
        got = inference.et_to_necrosis_tf(tf.constant(batch), n).numpy()
        expected = np.stack([volume.et_to_necrosis(c, n) for c in batch])
        np.testing.assert_array_equal(got, expected)
    # n = 6: the cases with 2 and 5 ET voxels change, those with 0 and 9 do not
    got = inference.et_to_necrosis_tf(tf.constant(batch), 6).numpy()
    assert [int((c == 4).sum()) for c in got] == [0, 0, 0, 9]


def _cases(rows):
    return [et_threshold.CaseET(f"c{i}", 1, p, d, t) for i, (p, d, t) in enumerate(rows)]


def test_score_and_choice_by_hand():
    # (predicted ET voxels, ET Dice, true ET voxels)
    cases = _cases(
        [
            (0, 1.0, 0),  # nothing predicted, nothing there
            (30, 0.0, 0),  # 30 false voxels on a case without ET
            (120, 0.0, 0),  # 120 false voxels
            (80, 0.6, 100),  # a small true ET, found
            (900, 0.9, 1000),
        ]
    )  # a large true ET
    assert et_threshold.score(cases, 0) == (pytest.approx((1 + 0 + 0 + 0.6 + 0.9) / 5), 0)
    # 50: the 30-voxel case becomes empty -> 1
    assert et_threshold.score(cases, 50) == (pytest.approx((1 + 1 + 0 + 0.6 + 0.9) / 5), 1)
    # 100: also the 80-voxel true ET is lost -> 0
    assert et_threshold.score(cases, 100) == (pytest.approx((1 + 1 + 0 + 0 + 0.9) / 5), 2)
    # 200: the 120-voxel false ET too
    assert et_threshold.score(cases, 200) == (pytest.approx((1 + 1 + 1 + 0 + 0.9) / 5), 3)
    best, table = et_threshold.choose(cases, [100, 50, 200, 1000])
    assert [r["et_min_voxels"] for r in table] == [0, 50, 100, 200, 1000]
    assert best == 200  # 3.9 / 5 against 3.5 / 5 at 50 and 2.5 / 5 at 1000
    # ties go to the smallest N: 31 and 50 both only empty the 30-voxel case
    best, _ = et_threshold.choose(cases, [31, 50])
    assert best == 31
    with pytest.raises(ValueError, match="no case"):
        et_threshold.score([], 10)


def _model_dir(root, name, fold):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(
        json.dumps({"model": {}, "train": {"seed": 0}, "data": {"fold": fold}})
    )
    return evaluation.LoadedModel(str(d / "segmenter.keras"), "keras", None, False)


def test_training_folds_exclude_and_refuse_the_held_out_ones(tmp_path):
    a, b = _model_dir(tmp_path, "a", 0), _model_dir(tmp_path, "b", 2)
    assert et_threshold.training_folds([a, b], 5) == [1, 3, 4]
    assert et_threshold.training_folds([a], 5, [3, 1]) == [1, 3]
    with pytest.raises(
        evaluation.EvaluationError, match=r"fold 2 is the held-out fold of model .*b"
    ):
        et_threshold.training_folds([a, b], 5, [1, 2])
    with pytest.raises(evaluation.EvaluationError, match="folds 0 to 4"):
        et_threshold.training_folds([a], 5, [5])
    bare = evaluation.LoadedModel(str(tmp_path / "x.keras"), "keras", None, False)
    with pytest.raises(evaluation.EvaluationError, match="give --folds"):
        et_threshold.training_folds([bare], 5)
    assert et_threshold.training_folds([bare], 5, [0]) == [0]
    everything = _model_dir(tmp_path, "all", -1)  # trained on every fold
    assert et_threshold.training_folds([everything], 3) == [0, 1, 2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Synthetic TFRecords in 3 folds and a model_dir (an untrained tiny model)
    that held out fold 0."""
    root = tmp_path_factory.mktemp("post")
    tfr = synthetic_tfrecords(root, 6, (40, 40, 32), folds=3)
    keras.utils.set_random_seed(2)
    model = build_model(ModelConfig(**TINY))
    md = root / "md"
    md.mkdir()
    keras.saving.save_model(model, str(md / "model.keras"))
    (md / "config.json").write_text(
        json.dumps(
            {
                "model": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                "train": {"seed": 0, "num_train_cases": 4},
                "data": {"fold": 0},
            }
        )
    )
    return tfr, md


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "brats_tf.postprocess", "--noprogress", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_chooses_on_the_training_folds(run_dir, tmp_path):
    tfr, md = run_dir
    out = tmp_path / "choice.json"
    result = _cli(f"--model={md}", f"--data={tfr}", f"--output={out}", "--candidates=10,100,1000")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["chosen_on"]["folds"] == [1, 2]
    manifest = json.loads((tfr / "manifest.json").read_text())
    ids = sorted(c["case_id"] for c in manifest["cases"] if c["fold"] in (1, 2))
    assert sorted(c["case_id"] for c in record["cases"]) == ids
    # each case's ET numbers, recomputed from the model's own prediction
    models = evaluation.load_models([str(md)])
    cases, _, _ = evaluation.open_cases(str(tfr), 1)
    for case in cases:
        probs = evaluation.ensemble_probabilities(models, case.image)
        predicted = int((inference.probabilities_to_labels(probs) == 4).sum())
        row = next(c for c in record["cases"] if c["case_id"] == case.case_id)
        assert row["predicted_voxels"] == predicted
        assert row["truth_voxels"] == int((case.label == constants.LABEL_ET).sum())
    # the choice is the table's best (ties: the smallest)
    table = record["table"]
    assert [r["et_min_voxels"] for r in table] == [0, 10, 100, 1000]
    best = max(r["mean_et_dice"] for r in table)
    assert record["et_min_voxels"] == min(
        r["et_min_voxels"] for r in table if r["mean_et_dice"] == best
    )
    assert f"--et_min_voxels={record['et_min_voxels']}" in result.stdout
    assert record["protocol"]["region"] == "brain_box" and record["protocol"]["tta"] == "none"


def test_command_refuses_the_held_out_fold_in_one_line(run_dir, tmp_path):
    tfr, md = run_dir
    out = tmp_path / "choice.json"
    result = _cli(f"--model={md}", f"--data={tfr}", f"--output={out}", "--folds=0,1")
    assert result.returncode != 0
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("brats_tf.postprocess")
    ]
    assert errors == [
        f"brats_tf.postprocess: error: fold 0 is the held-out fold of model "
        f"{md / 'model.keras'}: choose N on the folds it was trained on"
    ]
    assert not out.exists()
    out.write_text("mine")
    result = _cli(f"--model={md}", f"--data={tfr}", f"--output={out}")
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert out.read_text() == "mine"
