"""What an evaluation does (``EvalConfig``, evaluate.py's flags), the names of
the files it writes, and its error (``EvaluationError``, one line)."""

from __future__ import annotations

import dataclasses
import os

from brats_tf import metrics
from brats_tf.config import check_precision
from data_pipeline import volume

PER_CASE_CSV = "per_case.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
RUN_JSON = "evaluation.json"  # written by every run: marks a directory evaluate may overwrite
PREDICTIONS = "predictions"
PROBABILITIES = "probabilities"
FIGURES = "figures"


class EvaluationError(ValueError):
    """A bad input; str() is one line naming the model, case or file."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` does (evaluate.py's flags).

    Attributes:
      models: model paths (each a model_dir, a .keras file, a SavedModel dir or
        a checkpoint); several = an ensemble (§4).
      data: a TFRecord folder with manifest.json, or a folder of BraTS NIfTI cases.
      output_dir: everything is written here (nothing elsewhere).
      fold: with TFRecords, only this fold's (validation) shards; None = all.
      tta: mean over the 8 mirror flips (§4).
      crop_to_brain: run Keras models on the brain's bounding box
        (``volume.brain_box``); False: the whole padded volume (the paper).
      et_label: the ET value written in the predictions: 4 (BraTS 2017-2021)
        or 3 (BraTS 2023+); None (the default): the data's naming decides
        (``et_label_for_data``: 3 for BraTS 2023 names, else 4).
      threshold: a voxel is in a region when p > threshold.
      et_min_voxels: post-processing (not the paper's; 0: off): a case whose
        predicted ET has fewer voxels becomes necrosis there
        (``volume.et_to_necrosis``); choose it with ``brats_tf.postprocess``.
      precision: compute Keras models and checkpoints in this Keras dtype
        policy (``config.PRECISIONS``; ``mixed_bfloat16``: 2x faster on CPUs
        with AMX) instead of the one they were saved with (None). A
        SavedModel computes as it was exported; with a precision it is an error.
      hd95_mode: "pooled" (MedPy) or "max_directed" (metrics.HD95_MODES).
      save_probabilities: also write <case_id>_probabilities.nii.gz (float32 [D, H, W, 3]).
      figures: write a PNG per case.
      overwrite: replace an output_dir written by an earlier run.
      progress: show a tqdm progress bar.
    """

    models: tuple
    data: str
    output_dir: str
    fold: int | None = None
    tta: bool = False
    et_label: int | None = None
    threshold: float = 0.5
    et_min_voxels: int = 0
    crop_to_brain: bool = True
    precision: str | None = None
    hd95_mode: str = "pooled"
    save_probabilities: bool = False
    figures: bool = True
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        models = (self.models,) if isinstance(self.models, (str, os.PathLike)) else self.models
        models = tuple(str(m) for m in models)
        if not models or any(not m.strip() for m in models):
            raise ValueError(f"models must be one or more paths, got {self.models!r}")
        object.__setattr__(self, "models", models)
        for name in ("data", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ValueError(f"{name} must be a path, got {value!r}")
            object.__setattr__(self, name, str(value))
        if self.fold is not None and (
            isinstance(self.fold, bool) or not isinstance(self.fold, int) or self.fold < 0
        ):
            raise ValueError(f"fold must be None or an integer >= 0, got {self.fold!r}")
        if self.et_label is not None:
            volume.check_et_label(self.et_label)
        volume.check_threshold(self.threshold)
        volume.check_et_min_voxels(self.et_min_voxels)
        check_precision(self.precision)
        if self.hd95_mode not in metrics.HD95_MODES:
            raise ValueError(
                f"hd95_mode must be one of {metrics.HD95_MODES}, got {self.hd95_mode!r}"
            )
