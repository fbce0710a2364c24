"""Held-out evaluation shared by train.py (validation) and evaluate.py.

Whole volumes from the input pipeline's eval mode (the stored brain box,
normalised), full-volume inference (padding to a multiple of 8 and back, §3),
probabilities -> BraTS label map -> nested regions, and per-region Dice.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np

from brats_tf import constants, inference, metrics
from brats_tf.model import build_inference_model

log = logging.getLogger("brats_tf.evaluation")


def validation_dice(model, files, tta: bool = False) -> dict:
    """Mean per-region Dice ({"val_dice_WT", "val_dice_TC", "val_dice_ET"}) over ``files``.

    Args:
      model: a training model (its encoder and segmentation decoder are used).
      files: TFRecord shards written by data_pipeline.convert, with labels.
      tta: average the 8 mirror flips (§4).
    """
    from data_pipeline.input import InputConfig, make_dataset

    segmenter = build_inference_model(model)
    scores = {region: [] for region in constants.REGIONS}
    for example in make_dataset(InputConfig(files=tuple(files), mode="eval")):
        probs = inference.predict_volume(segmenter, example["image"][0].numpy(), tta=tta,
                                         normalize=False)
        predicted = inference.labels_to_regions(inference.probabilities_to_labels(probs))
        truth = example["label"][0].numpy() > 0.5
        for index, region in enumerate(constants.REGIONS):
            scores[region].append(metrics.dice(predicted[..., index], truth[..., index]))
    if not scores[constants.REGIONS[0]]:
        raise ValueError(f"no validation case in {list(files)}")
    result = {f"val_dice_{r}": float(np.mean(v)) for r, v in scores.items()}
    log.info("validation on %d cases: %s", len(scores[constants.REGIONS[0]]),
             "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def _save_keras_atomic(model, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    model.save(tmp)
    os.replace(tmp, path)


def save_final(model, model_dir: str, version: int = 1) -> list[str]:
    """Writes model.keras, segmenter.keras and export/<version>/ (SavedModel) into model_dir."""
    from brats_tf.export import export_saved_model

    model_path = os.path.join(model_dir, "model.keras")
    segmenter_path = os.path.join(model_dir, "segmenter.keras")
    _save_keras_atomic(model, model_path)
    _save_keras_atomic(build_inference_model(model), segmenter_path)
    export_dir = os.path.join(model_dir, "export")
    version_dir = export_saved_model(model, export_dir, version=version, overwrite=True)
    return [model_path, segmenter_path, str(version_dir)]
