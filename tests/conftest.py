"""Shared test set-up: quiet TensorFlow logs, float32 policy restored after each test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py and evaluate.py

import keras
import pytest


@pytest.fixture(autouse=True)
def _float32_policy():
    """Tests that switch to a mixed precision policy must not leak it."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
