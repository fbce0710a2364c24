"""Held-out evaluation of trained models (evaluate.py, paper §4).

Models (``load_models``: model_dirs, .keras files, SavedModels, checkpoints;
ensembles, TTA) on cases in their original grid (``open_cases``: TFRecords or
NIfTI folders), BraTS metrics, per-case CSV, summaries, NIfTI predictions and
figures; see EVALUATION.md. Paper §4: single model, TTA (mean of the 8 mirror
flips) and ensembles (mean of the models' probabilities); §1: labels and the
nested regions. Metrics and empty-mask rules: brats_tf/metrics.py; figures:
brats_tf/figures.py.

``config`` (EvalConfig, EvaluationError, file names), ``models`` (loading,
ensembles), ``members`` (training runs, member warnings), ``cases`` (case
readers), ``output_folder`` (output folder safety, staging, resume),
``one_case`` (one case predicted, scored, written), ``report`` (CSV and
summary tables), ``loop`` (``evaluate``), ``et_threshold`` (the ET
post-processing's N, chosen by ``python -m brats_tf.postprocess``).
"""

from brats_tf.evaluation.cases import (
    EvalCase,
    SkippedCase,
    et_label_for_data,
    open_cases,
    spacing_from_affine,
)
from brats_tf.evaluation.config import (
    FIGURES,
    PER_CASE_CSV,
    PREDICTIONS,
    PROBABILITIES,
    RUN_JSON,
    SUMMARY_CSV,
    SUMMARY_JSON,
    EvalConfig,
    EvaluationError,
)
from brats_tf.evaluation.loop import evaluate, run_protocol
from brats_tf.evaluation.members import member_warnings, training_run
from brats_tf.evaluation.models import (
    LoadedModel,
    ensemble_probabilities,
    expand_model_paths,
    input_channels,
    load_model,
    load_models,
)
from brats_tf.evaluation.output_folder import check_output_dir, staging_dir
from brats_tf.evaluation.report import per_case_rows, summary_rows
from data_pipeline.data_folder import is_tfrecord_dir

# train.py's validation and final save, defined in brats_tf.training

__all__ = [
    "EvalCase",
    "EvalConfig",
    "EvaluationError",
    "FIGURES",
    "LoadedModel",
    "PER_CASE_CSV",
    "PREDICTIONS",
    "PROBABILITIES",
    "RUN_JSON",
    "SUMMARY_CSV",
    "SUMMARY_JSON",
    "SkippedCase",
    "check_output_dir",
    "ensemble_probabilities",
    "et_label_for_data",
    "evaluate",
    "expand_model_paths",
    "input_channels",
    "is_tfrecord_dir",
    "load_model",
    "load_models",
    "member_warnings",
    "open_cases",
    "per_case_rows",
    "run_protocol",
    "spacing_from_affine",
    "staging_dir",
    "summary_rows",
    "training_run",
]
