"""Training and serving see the same input: the converter + input pipeline's
normalisation equals volume.normalize_nonzero (NumPy) and the SavedModel's
in-graph normalisation (inference.normalize_nonzero_tf), on a synthetic case."""

import numpy as np
import pytest
import tensorflow as tf

from brats_tf import inference
from data_pipeline import constants, volume
from data_pipeline.convert import convert
from data_pipeline.input import InputConfig, make_dataset
from data_pipeline.synthetic import make_case, write_case

SHAPE = (48, 40, 32)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    images, label = make_case(SHAPE, seed=3)
    write_case(str(root / "nii" / "HGG" / "Brats18_X_1"), "Brats18_X_1", images, label)
    convert(str(root / "nii"), str(root / "tfr"), folds=1, progress=False)
    raw = np.stack([images[m] for m in constants.MODALITIES], axis=-1).astype(np.float32)
    return raw, label, sorted(str(p) for p in (root / "tfr").glob("*.tfrecord"))


def test_eval_pipeline_equals_inference_normalisation(case):
    raw, label, files = case
    (example,) = list(make_dataset(InputConfig(files=tuple(files), mode="eval")))
    want = volume.normalize_nonzero(raw)
    np.testing.assert_allclose(example["image"][0].numpy(), want, atol=1e-5)
    graph = inference.normalize_nonzero_tf(tf.constant(raw[None]))[0].numpy()
    np.testing.assert_allclose(graph, want, atol=1e-5)
    regions = volume.labels_to_regions(label)
    np.testing.assert_array_equal(example["label"][0].numpy() > 0.5, regions)


def test_training_crop_without_augmentation_equals_normalised_volume(case):
    raw, label, files = case
    config = InputConfig(
        files=tuple(files), crop_shape=SHAPE, augment=False, seed=0, deterministic=True
    )
    (batch,) = list(make_dataset(config))
    want = volume.normalize_nonzero(raw)
    np.testing.assert_allclose(batch["image"][0].numpy(), want, atol=1e-5)
    np.testing.assert_array_equal(batch["label"][0].numpy() > 0.5, volume.labels_to_regions(label))
