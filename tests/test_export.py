"""brats_tf/inference/saved_model.py and `python -m brats_tf.export`: SavedModel layout,
signatures, numerical equality with Keras, CLI errors."""

import itertools
import json
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import oracles
import pytest
import tensorflow as tf
from importtime import imported_modules
from serving_fixtures import VERSION, tiny_export

from brats_tf import export
from brats_tf import inference as I
from brats_tf.config import ModelConfig
from brats_tf.model import build_inference_model, build_model
from data_pipeline import constants as C
from data_pipeline import volume as V

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first

REPO = pathlib.Path(__file__).resolve().parents[1]


def raw_batch(shape, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, 800, (batch,) + shape + (C.NUM_MODALITIES,)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0.0  # background
    return x


def keras_reference(model, batch, tta, multiple=8):
    """NumPy normalisation + padding, the Keras inference model, NumPy flips, crop back."""
    infer = build_inference_model(model)
    out = []
    for image in batch:
        padded, pads = oracles.pad_to_multiple(V.normalize_nonzero(image), multiple)
        x = padded[None]
        flips = [a for r in range(4) for a in itertools.combinations((1, 2, 3), r)] if tta else [()]
        probs = np.mean(
            [
                np.flip(
                    infer(np.ascontiguousarray(np.flip(x, a)), training=False)["seg"].numpy(), a
                )
                for a in flips
            ],
            axis=0,
        )
        out.append(oracles.crop_back(probs[0], pads))
    return np.stack(out)


def test_layout_and_metadata():
    _, _, version_dir, _ = tiny_export()
    assert version_dir.name == str(VERSION)
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables").is_dir()
    assert [p.name for p in version_dir.parent.iterdir()] == [str(VERSION)]  # no temp left
    meta = json.loads((version_dir / export.METADATA_FILE).read_text())
    assert meta["input"]["channels"] == list(C.MODALITIES)
    assert meta["outputs"]["probabilities"] == list(C.REGIONS)
    assert meta["et_label"] == C.LABEL_ET


def _xla_clusters(version_dir) -> list:
    """Names of the nodes and functions of a SavedModel that XLA must compile."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((pathlib.Path(version_dir) / "saved_model.pb").read_bytes())
    found = []
    for meta in saved.meta_graphs:
        library = meta.graph_def.library.function
        nodes = list(meta.graph_def.node) + [n for f in library for n in f.node_def]
        found += [
            n.name for n in nodes if "_XlaMustCompile" in n.attr and n.attr["_XlaMustCompile"].b
        ]
        found += [
            f.signature.name
            for f in library
            if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b
        ]
    return found


def test_saved_model_holds_no_xla_cluster(tmp_path):
    """TF Serving's XLA:CPU JIT is off by default, so the serving graph must not
    need XLA (a model trained with --jit_compile exports without it). The
    check itself finds a jit_compile function in a SavedModel."""
    _, _, version_dir, _ = tiny_export()
    assert _xla_clusters(version_dir) == []
    module = tf.Module()
    module.f = tf.function(
        lambda x: x * 2.0 + 1.0,
        jit_compile=True,
        input_signature=[tf.TensorSpec([None], tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path / "xla"))
    assert _xla_clusters(tmp_path / "xla") != []


def test_saved_model_cli_shows_both_signatures():
    _, _, version_dir, _ = tiny_export()
    script = pathlib.Path(sys.executable).with_name("saved_model_cli")  # .venv/bin/
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    )
    result = subprocess.run(
        command + ["show", "--dir", str(version_dir), "--all"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    text = result.stdout
    for name in export.SIGNATURES:
        m = re.search(rf"signature_def\['{name}'\]:(.*?)(?=signature_def\[|\Z)", text, re.S)
        assert m, f"signature {name} missing:\n{text}"
        block = re.sub(r"\s+", " ", m.group(1))
        assert re.search(
            r"inputs\['image'\] tensor_info: dtype: DT_FLOAT "
            r"shape: \(-1, -1, -1, -1, 4\)",
            block,
        ), block
        assert re.search(
            r"outputs\['probabilities'\] tensor_info: dtype: DT_FLOAT "
            r"shape: \(-1, -1, -1, -1, 3\)",
            block,
        ), block
        assert re.search(
            r"outputs\['labels'\] tensor_info: dtype: DT_UINT8 "
            r"shape: \(-1, -1, -1, -1\)",
            block,
        ), block
        assert re.search(
            r"outputs\['protocol'\] tensor_info: dtype: DT_STRING "
            r"shape: \(-1\)",
            block,
        ), block
        assert "Method name is: tensorflow/serving/predict" in block


@pytest.mark.parametrize(
    "signature, shape, batch",
    [
        ("serving_default", (20, 28, 13), 1),
        ("serving_default", (9, 16, 8), 2),
        ("serving_tta", (20, 28, 13), 1),
    ],
)
def test_signature_matches_keras_model(signature, shape, batch):
    model, _, _, loaded = tiny_export()
    x = raw_batch(shape, batch, seed=batch)
    out = loaded.signatures[signature](image=tf.constant(x))
    probs, labels = out["probabilities"].numpy(), out["labels"].numpy()
    assert probs.shape == (batch,) + shape + (3,) and probs.dtype == np.float32
    assert labels.shape == (batch,) + shape and labels.dtype == np.uint8
    expected = keras_reference(model, x, tta=signature == "serving_tta")
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    clear = np.all(np.abs(expected - 0.5) > 1e-4, axis=-1)  # no threshold ties
    np.testing.assert_array_equal(labels[clear], I.probabilities_to_labels(expected)[clear])
    assert len(np.unique(labels)) > 1  # the check is not vacuous


def test_signature_on_all_zero_input_and_wrong_channels():
    _, _, _, loaded = tiny_export()
    out = loaded.signatures["serving_default"](image=tf.zeros((1, 8, 9, 10, 4)))
    assert np.all(np.isfinite(out["probabilities"].numpy()))
    with pytest.raises((ValueError, TypeError, tf.errors.InvalidArgumentError)):
        loaded.signatures["serving_default"](image=tf.zeros((1, 8, 8, 8, 3)))


def test_export_argument_errors(tmp_path):
    model, keras_path, version_dir, _ = tiny_export()
    with pytest.raises(FileExistsError, match=f"{VERSION} exists and is not empty"):
        export.export_saved_model(model, version_dir.parent, version=VERSION)
    with pytest.raises(ValueError, match="version must be a positive integer, got 0"):
        export.export_saved_model(model, tmp_path, version=0)
    with pytest.raises(ValueError, match="et_label"):
        export.export_saved_model(model, tmp_path, et_label=2)
    with pytest.raises(FileNotFoundError, match="model file not found: .*nope.keras"):
        export.run(
            export.ExportConfig(model=str(tmp_path / "nope.keras"), export_dir=str(tmp_path))
        )
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.run(
            export.ExportConfig(
                model=str(keras_path), export_dir=str(version_dir.parent), version=VERSION
            )
        )
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"must be a \.keras file"):
        export.run(
            export.ExportConfig(model=str(tmp_path / "notes.txt"), export_dir=str(tmp_path / "out"))
        )
    assert not (tmp_path / "out").exists()


def run_cli(*args, importtime=False):
    """``python -m brats_tf.export`` with args; importtime: every module it
    imports, one line each, in its stderr."""
    return subprocess.run(
        [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "brats_tf.export"]
        + list(args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_missing_model_is_one_line_error(tmp_path):
    """One line, nothing written, and before TensorFlow is imported."""
    result = run_cli(
        f"--model={tmp_path / 'missing.keras'}", f"--export_dir={tmp_path / 'e'}", importtime=True
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert (
        lines[-1] == f"brats_tf.export: error: model file not found: {tmp_path / 'missing.keras'}"
    )
    assert not (tmp_path / "e").exists()
    imported = imported_modules(result.stderr)
    assert "absl.flags" in imported and "tensorflow" not in imported


def test_cli_exports_and_overwrites(tmp_path):
    # a 2-level model (inputs divisible by 2) keeps this subprocess export quick
    keras.utils.set_random_seed(1)
    model = build_model(
        ModelConfig(
            input_shape=(8, 8, 8), init_filters=8, latent_dim=4, blocks_down=(1, 1), blocks_up=(1,)
        )
    )
    keras_path = tmp_path / "small.keras"
    model.save(keras_path)
    target = tmp_path / "brats" / "1"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old version")
    result = run_cli(
        f"--model={keras_path}",
        f"--export_dir={tmp_path / 'brats'}",
        "--overwrite",
        "--et_label=3",
        "--precision=float32",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (target / "stale.txt").exists()
    assert [p.name for p in (tmp_path / "brats").iterdir()] == ["1"]
    meta = json.loads((target / export.METADATA_FILE).read_text())
    assert meta["et_label"] == 3 and meta["precision"] == "float32"
    loaded = tf.saved_model.load(str(target))
    x = raw_batch((7, 8, 5), seed=5)
    out = loaded.signatures["serving_default"](image=tf.constant(x))
    expected = keras_reference(model, x, tta=False)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=2e-5)
    labels = out["labels"].numpy()
    clear = np.all(np.abs(expected - 0.5) > 1e-4, axis=-1)
    np.testing.assert_array_equal(
        labels[clear], I.probabilities_to_labels(expected, et_label=C.LABEL_ET_2023)[clear]
    )
    assert C.LABEL_ET not in labels  # BraTS 2023 labels


def test_export_of_mixed_precision_model(tmp_path):
    """A model trained under mixed_float16 serves float32 in and out, like its Keras model."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(2)
    model = build_model(
        ModelConfig(
            input_shape=(8, 8, 8), init_filters=8, latent_dim=4, blocks_down=(1, 1), blocks_up=(1,)
        )
    )
    keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("InitConv").compute_dtype == "float16"
    loaded = tf.saved_model.load(str(export.export_saved_model(model, tmp_path / "amp")))
    x = raw_batch((6, 10, 7), seed=3)
    probs = loaded.signatures["serving_default"](image=tf.constant(x))["probabilities"]
    assert probs.dtype == tf.float32
    expected = keras_reference(model, x, tta=False)
    np.testing.assert_allclose(probs.numpy(), expected, atol=2e-3)


def test_export_in_another_precision(tmp_path):
    """precision='mixed_bfloat16' serves a float32 model computing in bfloat16
    (float32 in and out), close to the float32 SavedModel; the metadata says so."""
    keras.utils.set_random_seed(4)
    model = build_model(
        ModelConfig(
            input_shape=(8, 8, 8), init_filters=8, latent_dim=4, blocks_down=(1, 1), blocks_up=(1,)
        )
    )
    x = tf.constant(raw_batch((6, 10, 7), seed=5))
    probs = {}
    for precision in (None, "mixed_bfloat16"):
        version = export.export_saved_model(model, tmp_path / str(precision), precision=precision)
        meta = json.loads((version / export.METADATA_FILE).read_text())
        assert meta["precision"] == (precision or "float32")
        loaded = tf.saved_model.load(str(version))
        probs[precision] = loaded.signatures["serving_default"](image=x)["probabilities"]
        assert probs[precision].dtype == tf.float32
    assert model.get_layer("InitConv").compute_dtype == "float32"  # untouched
    diff = np.abs(probs["mixed_bfloat16"].numpy() - probs[None].numpy())
    assert 0 < diff.max() < 0.06, diff.max()
    with pytest.raises(ValueError, match="precision"):
        export.ExportConfig(model="m.keras", export_dir="e", precision="half")


def test_brain_box_in_the_graph_matches_numpy_and_can_be_turned_off(tmp_path):
    """A head with zero background around it: the default SavedModel runs the
    network on the brain's box (as inference.predict_volume); one exported with
    crop_to_brain=False runs the whole padded volume (the paper)."""
    model, _, version_dir, loaded = tiny_export()
    x = np.zeros((1, 30, 36, 21, C.NUM_MODALITIES), np.float32)
    x[:, 6:22, 5:30, 3:19] = raw_batch((16, 25, 16), seed=9)
    x[:, 6:22, 5:30, 3:19][x[:, 6:22, 5:30, 3:19] == 0] = 1.0  # a solid brain
    assert json.loads((version_dir / export.METADATA_FILE).read_text())["crop_to_brain"]
    image = x[0]
    start, size = V.brain_box(V.normalize_nonzero(image))
    assert size == (16, 32, 16)  # 16 x 25 x 16 grown to multiples of 8
    box = tuple(slice(s, s + n) for s, n in zip(start, size))
    expected_box = V.paste_crop(
        keras_reference(model, image[box][None], tta=False)[0], image.shape[:3], start
    )
    expected_full = keras_reference(model, x, tta=False)[0]
    assert np.abs(expected_box - expected_full).max() > 1e-3  # the two really differ

    boxed = loaded.signatures["serving_default"](image=tf.constant(x))
    np.testing.assert_allclose(boxed["probabilities"].numpy()[0], expected_box, atol=2e-5)
    outside = np.ones(image.shape[:3], bool)
    outside[box] = False
    assert not boxed["labels"].numpy()[0][outside].any()
    np.testing.assert_allclose(I.predict_volume(model, image), expected_box, atol=2e-5)

    whole = tf.saved_model.load(
        str(export.export_saved_model(model, tmp_path / "whole", crop_to_brain=False))
    )
    out = whole.signatures["serving_default"](image=tf.constant(x))["probabilities"].numpy()[0]
    np.testing.assert_allclose(out, expected_full, atol=2e-5)
    np.testing.assert_allclose(
        I.predict_volume(model, image, crop_to_brain=False), expected_full, atol=2e-5
    )


def _small(seed):
    # 2 levels (inputs divisible by 2): quick to export
    keras.utils.set_random_seed(seed)
    return build_model(
        ModelConfig(
            input_shape=(8, 8, 8), init_filters=8, latent_dim=4, blocks_down=(1, 1), blocks_up=(1,)
        )
    )


def test_protocol_output_and_metadata():
    _, _, version_dir, loaded = tiny_export()
    meta = json.loads((version_dir / export.METADATA_FILE).read_text())
    x = raw_batch((9, 16, 8), batch=2, seed=4)
    for signature, key, tta in [
        ("serving_default", "protocol", "none"),
        ("serving_tta", "protocol_serving_tta", "8 mirror flips"),
    ]:
        out = loaded.signatures[signature](image=tf.constant(x))["protocol"].numpy()
        assert out.shape == (2,)
        protocol = json.loads(out[0].decode())
        assert protocol == meta[key] and out[1] == out[0]
        assert protocol == {
            "region": "brain_box",
            "tta": tta,
            "ensemble_size": 1,
            "threshold": 0.5,
            "et_min_voxels": 0,
            "post_processing": "none",
            "padding": "zeros to a multiple of 8, split evenly (odd voxel after)",
        }


def test_ensemble_export_is_the_mean_and_post_processing_runs_in_the_graph(tmp_path):
    a, b = _small(1), _small(2)
    x = raw_batch((7, 8, 6), batch=2, seed=6)
    x[1, :, :, :3] = 0.0  # a smaller brain: the two cases get different ET volumes
    expected = (keras_reference(a, x, False) + keras_reference(b, x, False)) / 2
    plain = tf.saved_model.load(str(export.export_saved_model([a, b], tmp_path / "plain")))
    out = plain.signatures["serving_default"](image=tf.constant(x))
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=2e-5)
    assert np.abs(keras_reference(a, x, False) - expected).max() > 1e-3  # not one model
    labels = out["labels"].numpy()
    assert json.loads(out["protocol"].numpy()[0].decode())["ensemble_size"] == 2
    counts = [int((c == C.LABEL_ET).sum()) for c in labels]
    assert min(counts) > 0 and counts[0] != counts[1], counts
    n = max(counts)  # the case with fewer ET voxels loses them, the other keeps them
    post_dir = export.export_saved_model([a, b], tmp_path / "post", et_min_voxels=n)
    post = tf.saved_model.load(str(post_dir))
    got = post.signatures["serving_default"](image=tf.constant(x))
    for case, before in zip(got["labels"].numpy(), labels):
        want = before.copy()
        if (before == C.LABEL_ET).sum() < n:
            want[before == C.LABEL_ET] = 1
        np.testing.assert_array_equal(case, want)
    assert sorted(int((c == C.LABEL_ET).sum()) for c in got["labels"].numpy()) == [0, n]
    meta = json.loads((post_dir / export.METADATA_FILE).read_text())
    assert meta["et_min_voxels"] == n and meta["protocol"]["ensemble_size"] == 2
    assert json.loads(got["protocol"].numpy()[0].decode()) == meta["protocol"]
    with pytest.raises(ValueError, match="et_min_voxels"):
        export.export_saved_model(a, tmp_path / "bad", et_min_voxels=-2)
    with pytest.raises(ValueError, match="no model"):
        export.export_saved_model([], tmp_path / "none")


def test_cli_exports_an_ensemble_from_a_pattern(tmp_path):
    for k in (0, 1):
        (tmp_path / f"member_{k}").mkdir()
        _small(k + 3).save(tmp_path / f"member_{k}" / "model.keras")
    result = run_cli(
        f"--model={tmp_path}/member_*/model.keras",
        f"--export_dir={tmp_path / 'e'}",
        "--et_min_voxels=50",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "e" / "1" / export.METADATA_FILE).read_text())
    assert meta["protocol"]["ensemble_size"] == 2 and meta["protocol"]["et_min_voxels"] == 50
    result = run_cli(f"--model={tmp_path}/nothing_*/model.keras", f"--export_dir={tmp_path / 'f'}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"brats_tf.export: error: model pattern {tmp_path}/nothing_*/model.keras matches no file"
    )
    assert not (tmp_path / "f").exists()
