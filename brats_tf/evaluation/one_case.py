"""One case of an evaluation: predicted (the ensemble's mean probabilities,
TTA, §4), turned into BraTS labels (§1) and post-processed, scored against its
labels, and written: the prediction NIfTI, the probabilities, the figure."""

from __future__ import annotations

import pathlib

import nibabel as nib
import numpy as np

from brats_tf import figures, inference, metrics
from brats_tf.evaluation.cases import EvalCase
from brats_tf.evaluation.config import FIGURES, PREDICTIONS, PROBABILITIES, EvalConfig
from brats_tf.evaluation.models import LoadedModel, ensemble_probabilities
from data_pipeline import constants, volume
from data_pipeline.io_utils import atomic_path


def evaluate_case(
    case: EvalCase,
    models: list[LoadedModel],
    config: EvalConfig,
    et_label: int,
    staging: pathlib.Path,
) -> dict:
    """Predicts, scores and writes one case into ``staging``; returns its
    record: case_id, metrics (None without labels), spacing, files written."""
    probs = ensemble_probabilities(models, case.image, config.tta, config.crop_to_brain)
    labels = inference.probabilities_to_labels(probs, config.threshold, et_label)
    labels = volume.et_to_necrosis(labels, config.et_min_voxels, et_label)
    written = [f"{PREDICTIONS}/{case.case_id}.nii.gz"]
    inference.write_prediction_nifti(
        labels, _reference_for(case), staging / written[-1], case_id=case.case_id, et_label=et_label
    )
    if config.save_probabilities:
        written.append(f"{PROBABILITIES}/{case.case_id}_probabilities.nii.gz")
        _write_probabilities(probs, case, staging / written[-1])
    truth = scores = None
    if case.label is not None:
        truth = case.label.copy()
        truth[truth == constants.LABEL_ET] = et_label  # the project's ET (4) -> the output's
        scores = metrics.case_metrics(labels, truth, case.spacing, et_label, config.hd95_mode)
    if config.figures:
        rgb = figures.case_figure(
            case.image[..., constants.MODALITIES.index("t1ce")],
            case.affine,
            truth,
            labels,
            et_label=et_label,
            title=case.case_id,
        )
        written.append(f"{FIGURES}/{case.case_id}.png")
        figures.write_png(rgb, staging / written[-1])
    return {
        "case_id": case.case_id,
        "metrics": scores,
        "spacing": [float(z) for z in case.spacing],
        "written": written,
    }


def _write_probabilities(probs: np.ndarray, case: EvalCase, path: pathlib.Path) -> None:
    img = nib.Nifti1Image(np.asarray(probs, np.float32), case.affine)  # [D, H, W, 3]: WT, TC, ET
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def _reference_for(case: EvalCase):
    if case.reference is not None:
        return case.reference
    header = nib.Nifti1Header()
    header.set_data_shape(case.image.shape[:3])
    header.set_zooms(case.spacing)
    return case.affine, header
