"""The final save of a training run: the training model, the inference model
and the SavedModel, written atomically into its model_dir."""

from __future__ import annotations

import logging
import os

from brats_tf.inference.saved_model import export_saved_model
from brats_tf.model import build_inference_model
from data_pipeline.io_utils import atomic_path, remove_path, stale_temporaries

log = logging.getLogger("brats_tf.inference")


def _save_keras_atomic(model, path: str) -> None:
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(str(tmp))


def save_final(
    model, model_dir: str, version: int = 1, keep_newer_than: float | None = None
) -> list[str]:
    """Writes model.keras (the training model), segmenter.keras (the inference
    model) and export/<version>/ (SavedModel) into model_dir; returns the
    paths written.

    First removes what an earlier save into model_dir, killed before its
    rename, left there: the temporaries of exactly those three
    (``io_utils.stale_temporaries``), nothing else.

    Args:
      keep_newer_than: a time (seconds since the epoch; train.py: the latest
        checkpoint's): each of the three that exists and was written since
        is kept as it is, so that a rerun of a finished run rewrites nothing.
        None: all three are written.
    """
    model_path = os.path.join(model_dir, "model.keras")
    segmenter_path = os.path.join(model_dir, "segmenter.keras")
    export_dir = os.path.join(model_dir, "export")
    version_dir = os.path.join(export_dir, str(version))
    for stale in (
        stale_temporaries(model_path, ".keras")
        + stale_temporaries(segmenter_path, ".keras")
        + stale_temporaries(version_dir, directory=True)
    ):
        remove_path(stale)
        log.info("removed %s, left by an interrupted save", stale)

    def current(path: str) -> bool:
        return (
            keep_newer_than is not None
            and os.path.isfile(path)
            and os.path.getmtime(path) >= keep_newer_than
        )

    written = []
    if not current(model_path):
        _save_keras_atomic(model, model_path)
        written.append(model_path)
    if not current(segmenter_path):
        _save_keras_atomic(build_inference_model(model), segmenter_path)
        written.append(segmenter_path)
    if not current(os.path.join(version_dir, "saved_model.pb")):
        written.append(str(export_saved_model(model, export_dir, version=version, overwrite=True)))
    return written
