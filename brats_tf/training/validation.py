"""Validation during training: the mean per-region Dice of the held-out
cases, predicted as evaluate.py does by default (the network on the brain's
bounding box, padded to a multiple of 8 and back, §3), after an epoch."""

from __future__ import annotations

import logging
import weakref

import numpy as np

from brats_tf import inference, metrics
from brats_tf.model import build_inference_model
from data_pipeline import constants, volume
from data_pipeline.input import InputConfig, make_dataset

log = logging.getLogger("brats_tf.training")

# training model -> its inference model, made once: predict_volume caches its
# traced graph per inference model, so a new one at every validation would
# trace the network again each time (weak keys: the cache keeps nothing alive).
_SEGMENTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def validation_dice(model, files, tta: bool = False) -> dict:
    """Mean per-region Dice ({"val_dice_WT", "val_dice_TC", "val_dice_ET"}) over ``files``.

    Whole volumes in the original grid from the input pipeline's eval mode
    (normalised); ``predict_volume`` runs the network on the brain's bounding
    box; probabilities -> BraTS label map -> nested regions.

    Args:
      model: a training model (its encoder and segmentation decoder are used).
      files: TFRecord shards written by data_pipeline.convert, with labels.
      tta: average the 8 mirror flips (§4).
    """
    segmenter = _SEGMENTERS.get(model)
    if segmenter is None:
        segmenter = _SEGMENTERS[model] = build_inference_model(model)
    scores = {region: [] for region in constants.REGIONS}
    for example in make_dataset(InputConfig(files=tuple(files), mode="eval")):
        probs = inference.predict_volume(
            segmenter, example["image"][0].numpy(), tta=tta, normalize=False
        )
        predicted = volume.labels_to_regions(inference.probabilities_to_labels(probs))
        truth = example["label"][0].numpy() > 0.5
        for index, region in enumerate(constants.REGIONS):
            scores[region].append(metrics.dice(predicted[..., index], truth[..., index]))
    if not scores[constants.REGIONS[0]]:
        raise ValueError(f"no validation case in {list(files)}")
    result = {f"val_dice_{r}": float(np.mean(v)) for r, v in scores.items()}
    log.info(
        "validation on %d cases: %s",
        len(scores[constants.REGIONS[0]]),
        "  ".join(f"{k} {v:.4f}" for k, v in result.items()),
    )
    return result
