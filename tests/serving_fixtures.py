"""One tiny exported SavedModel shared by test_export.py and test_client.py (built once)."""

import atexit
import functools
import pathlib
import shutil
import tempfile

import keras
import tensorflow as tf

from brats_tf.config import ModelConfig
from brats_tf.export import export_saved_model
from brats_tf.model import build_model

# One ResNet block per encoder level (the paper: 1, 2, 2, 4): serving does not
# depend on the depth, and a smaller graph traces and loads faster.
TINY = ModelConfig(
    input_shape=(32, 32, 32), init_filters=8, latent_dim=16, seed=0, blocks_down=(1, 1, 1, 1)
)
VERSION = 3


@functools.cache
def tiny_export():
    """(training model, .keras path, version dir, loaded SavedModel), made once per test run."""
    keras.utils.set_random_seed(0)
    model = build_model(TINY)
    root = pathlib.Path(tempfile.mkdtemp(prefix="brats_export_test_"))
    atexit.register(shutil.rmtree, root, True)
    keras_path = root / "tiny.keras"
    model.save(keras_path)
    version_dir = export_saved_model(model, root / "brats", version=VERSION)
    return model, keras_path, version_dir, tf.saved_model.load(str(version_dir))
