"""Shared test set-up: quiet TensorFlow logs, float32 policy restored after each test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py and evaluate.py

import keras
import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "heavy: a test file whose tests take a minute or more on 2 cores in all "
        "(training, conversion or evaluation runs): scheduled before the others",
    )


def pytest_collection_modifyitems(config, items):
    """The heavy files first, each file's tests in their order: ``make test``'s
    two workers take a file at a time in this order, so that the light files
    fill the end and neither worker waits long for the other's last file."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Tests that switch to a mixed precision policy must not leak it."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
