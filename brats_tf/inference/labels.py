"""Region probabilities -> BraTS label maps (§1), in NumPy and in the graph, and
the optional ET post-processing in the graph.

A voxel is in a region when its probability is STRICTLY greater than the
threshold (0.5), as in ``metrics.RegionDice``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data_pipeline import constants, volume

_WT = constants.REGIONS.index("WT")
_TC = constants.REGIONS.index("TC")
_ET = constants.REGIONS.index("ET")


def probabilities_to_labels(
    probs: np.ndarray, threshold: float = 0.5, et_label: int = constants.LABEL_ET
) -> np.ndarray:
    """Region probabilities [..., 3] (WT, TC, ET) -> BraTS label map [...] uint8 (§1).

    Each channel is thresholded (p > threshold). Nesting is enforced by the
    paper's order: ET -> ``et_label`` (4, or 3 for BraTS 2023); else TC -> 1
    (NCR/NET); else WT -> 2 (ED); else 0. So an ET voxel is labelled ET even
    where the TC or WT channel is below threshold (ET implies TC implies WT).
    """
    probs = np.asarray(probs)
    if probs.ndim < 1 or probs.shape[-1] != constants.NUM_REGIONS:
        raise ValueError(
            f"probs must be [..., {constants.NUM_REGIONS}] ({', '.join(constants.REGIONS)}), "
            f"got shape {probs.shape}"
        )
    threshold, et_label = volume.check_threshold(threshold), volume.check_et_label(et_label)
    on = probs > threshold
    labels = np.full(probs.shape[:-1], constants.LABEL_BACKGROUND, np.uint8)
    labels[on[..., _WT]] = constants.LABEL_ED
    labels[on[..., _TC]] = constants.LABEL_NCR_NET
    labels[on[..., _ET]] = et_label
    return labels


def probabilities_to_labels_tf(
    probs: tf.Tensor, threshold: float = 0.5, et_label: int = constants.LABEL_ET
) -> tf.Tensor:
    """Graph version of ``probabilities_to_labels``: [..., 3] -> [...] uint8."""
    threshold, et_label = volume.check_threshold(threshold), volume.check_et_label(et_label)
    on = tf.cast(probs, tf.float32) > threshold

    def fill(value):
        return tf.fill(tf.shape(on)[:-1], tf.constant(value, tf.uint8))

    labels = tf.where(on[..., _WT], fill(constants.LABEL_ED), fill(constants.LABEL_BACKGROUND))
    labels = tf.where(on[..., _TC], fill(constants.LABEL_NCR_NET), labels)
    return tf.where(on[..., _ET], fill(et_label), labels)


def et_to_necrosis_tf(
    labels: tf.Tensor, et_min_voxels: int, et_label: int = constants.LABEL_ET
) -> tf.Tensor:
    """Graph version of ``volume.et_to_necrosis`` for a batch [B, D, H, W] of
    label maps: each case's ET count against ``et_min_voxels`` (0: unchanged)."""
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    et_label = volume.check_et_label(et_label)
    if et_min_voxels == 0:
        return labels
    et = tf.equal(labels, tf.constant(et_label, labels.dtype))
    count = tf.reduce_sum(tf.cast(et, tf.int64), axis=[1, 2, 3])
    small = tf.reshape(count < et_min_voxels, [-1, 1, 1, 1])
    necrosis = tf.fill(tf.shape(labels), tf.constant(constants.LABEL_NCR_NET, labels.dtype))
    return tf.where(et & small, necrosis, labels)
